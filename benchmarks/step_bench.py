"""One denoising step, side by side, each implementation in its own process.

The same random checkpoint (the issue's preset: hidden 512, 6 layers of which one
full-attention, 32 experts top-4, vocab 16,384, float32) and the same 512-token prompt
and 256-token canvas go to one worker process per implementation:

- `ours`: this package; the whole step is one `next()` of the public `generate_step`.
- `mlx-vlm`: its model through its public diffusion methods and, for the sampler, the
  helpers its own generation loop calls (its default confidence-threshold sampler at its
  default temperature 0), plus its entropy-bound sampler at temperature 1 (the reference's
  rule, the same work as ours) as a second row.
- `transformers`: `from_pretrained` with each experts implementation and thread count
  (the fastest is reported), its public sampler classes as in its generate loop.

The parent only writes the checkpoint (in a child) and drives the workers over pipes, one
command at a time, so no two implementations ever run at once and machine noise falls on
them alike (the order rotates every round). MLX workers preload OpenBLAS (the Linux
`mlx[cpu]` wheel links the reference BLAS); the torch workers do not, and no torch worker
imports MLX. Each worker reports wall time and its own CPU time (all its threads).

    python benchmarks/step_bench.py --rounds 7 --out benchmarks/results/step_bench.json
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(
    vocab_size=16384, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    global_head_dim=128, num_global_key_value_heads=2,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=1024,
    num_experts=32, top_k_experts=4, max_position_embeddings=8192,
)
CANVAS, PROMPT, T, BOUND = 256, 512, 0.6, 0.1
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def inputs():
    import numpy as np

    rng = np.random.RandomState(0)
    return rng.randint(0, SHAPE["vocab_size"], (1, PROMPT)), rng.randint(0, SHAPE["vocab_size"], (1, CANVAS))


def write_checkpoint(path: Path) -> None:
    """A random reference model, saved with the released config.json field names."""
    from common import save_random_reference

    save_random_reference(path, CANVAS, SHAPE)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    text.pop("per_layer_config")  # mlx-vlm reads only the released global_* fields
    text.update(global_head_dim=SHAPE["global_head_dim"], num_global_key_value_heads=SHAPE["num_global_key_value_heads"])
    (path / "config.json").write_text(json.dumps(config))


# --- workers: each answers `forward`, `forward_sc`, `step` and its own `part:*` commands ---

class Ours:
    def __init__(self, path):
        import mlx.core as mx

        from mlx_diffusiongemma import generate_step, load_model
        from mlx_diffusiongemma.sample import sampler_step

        self.mx, self.sampler_step = mx, sampler_step
        prompt, canvas = inputs()
        self.model = load_model(path)
        self.cache = self.model.make_cache()
        self.model.encode(mx.array(prompt), self.cache)
        self.canvas = mx.array(canvas, dtype=mx.int32)
        logits = self.model.denoise(self.canvas, self.cache)
        self.scaled, self.probs = self._sample(logits)[:2]
        mx.eval(self.scaled, self.probs)
        # The whole step as users get it: one canvas that never meets its stop test.
        self.steps = generate_step(self.model, prompt[0].tolist(), seed=0, max_denoising_steps=1_000_000,
                                   confidence_threshold=1e-30, max_tokens=CANVAS)
        self.parts = {
            "part:self-conditioning signal": self._signal,
            "part:decoder layers": self._layers,
            "part:LM head + softcap": self._head,
            "part:sampler": self._sampler,
        }

    def _sample(self, logits):
        mx = self.mx
        keys = mx.random.split(mx.random.key(0))
        pinned = mx.zeros(self.canvas.shape, dtype=mx.bool_)
        return self.sampler_step(logits, mx.array(1 / T), mx.array(BOUND), keys, pinned)

    def forward(self):
        self.mx.eval(self.model.denoise(self.canvas, self.cache))

    def forward_sc(self):
        self.mx.eval(self.model.denoise(self.canvas, self.cache, self.scaled, self_conditioning_probs=self.probs))

    def step(self):
        next(self.steps)

    def _signal(self):
        d = self.model.model.decoder
        x = d.embed(self.canvas)
        self.mx.eval(d.self_conditioning(x, d.soft_embed(self.scaled, x.dtype, self.probs)))

    def _hidden(self):
        d = self.model.model.decoder
        x = d.self_conditioning(d.embed(self.canvas), None)
        for layer, c in zip(self.model.layers, self.cache):
            x = layer.feed_forward(layer.attend(x, c, decoding=True), layer.layer_scalar, self.model.moe_grouped)
        return x

    def _layers(self):
        self.mx.eval(self._hidden())

    def _head(self):
        from mlx_diffusiongemma.models.diffusion_gemma import softcap

        mx, d = self.mx, self.model.model.decoder
        if not hasattr(self, "hidden"):
            self.hidden = self._hidden()
            mx.eval(self.hidden)
        mx.eval(softcap(d.embed_tokens.as_linear(d.norm(self.hidden)), mx.array(self.model.args.final_logit_softcapping)))

    def _sampler(self):
        if not hasattr(self, "logits"):
            self.logits = self.model.denoise(self.canvas, self.cache)
            self.mx.eval(self.logits)
        self.mx.eval(*self._sample(self.logits))


class MlxVlm:
    """mlx-vlm 0.7.10's model; its sampler through the helpers its generation loop calls."""

    def __init__(self, path, sampler="confidence-threshold", model=None, prompt=None, canvas=None):
        import mlx.core as mx
        from mlx_vlm.generate import diffusion as g
        from mlx_vlm.utils import load_model

        self.mx, self.g, self.sampler = mx, g, sampler
        if model is None:
            prompt, canvas = inputs()
        self.model = load_model(Path(path)) if model is None else model
        self.cache = self.model.diffusion_prefill_cache(
            mx.array(prompt).reshape(1, -1), attention_mask=None, cache=self.model.make_cache(), pixel_values=None,
            mm_token_type_ids=None, prefill_step_size=None, chunk_prefill=False,
        )
        self.canvas = mx.array(canvas, dtype=mx.int32)
        self.context = self.model.diffusion_prepare_self_conditioning()
        logits = self.model.diffusion_decoder_logits(self.canvas, self.cache)
        self.previous = logits / T
        mx.eval(self.previous)
        self.signal, self.history = None, []
        self.revealed = mx.zeros(self.canvas.shape, dtype=mx.bool_)
        self.draft = self.canvas
        self.parts = {"part:self-conditioning signal": self._signal, "part:sampler": self._sampler}

    @classmethod
    def from_model(cls, model, prompt, canvas):
        """A runner on a model already built (benchmarks/gpu_full_size.py)."""
        return cls(None, model=model, prompt=prompt, canvas=canvas)

    def forward(self):
        self.mx.eval(self.model.diffusion_decoder_logits(self.canvas, self.cache))

    def forward_sc(self):
        signal = self.model.diffusion_self_conditioning(self.previous, self.context)
        self.mx.eval(self.model.diffusion_decoder_logits(self.canvas, self.cache, self_conditioning=signal))

    def _signal(self):
        self.mx.eval(self.model.diffusion_self_conditioning(self.previous, self.context))

    def _sampler(self):
        self.mx.eval(self._update(self.previous, self.canvas)[0])

    def _update(self, processed, canvas):
        mx, g = self.mx, self.g
        B, L = canvas.shape
        V = processed.shape[-1]
        if self.sampler == "entropy-bound":
            sampled = g._diffusion_sample_canvas(processed, canvas.dtype, 1.0)
            accept = g._diffusion_entropy_transfer_mask(g._diffusion_token_entropy(processed), BOUND)
            noise = g._diffusion_initialize_canvas(B, L, V, canvas.dtype)
            return mx.where(accept, sampled, noise), accept
        sampled = mx.argmax(processed, axis=-1).astype(canvas.dtype)  # its default temperature 0
        confidence = g._diffusion_token_probability(processed, sampled)
        accept = g._diffusion_confidence_transfer_mask(confidence, ~self.revealed, 0.9)
        accepted = mx.where(accept, sampled, self.draft)
        noise = g._diffusion_initialize_canvas(B, L, V, canvas.dtype)
        next_canvas = mx.where(self.revealed | accept, accepted, noise)
        self.revealed = self.revealed | accept
        self.draft = mx.where(accept, accepted, self.draft)
        return next_canvas, accept

    def step(self):
        """One step of its generation loop, in its order (the canvas is kept from revealing
        everything, so every step does the same work)."""
        mx, g, m = self.mx, self.g, self.model
        logits = m.diffusion_decoder_logits(self.canvas, self.cache, self_conditioning=self.signal)
        processed = logits / T
        argmax = mx.argmax(processed, axis=-1).astype(self.canvas.dtype)
        self.revealed = mx.zeros_like(self.revealed)
        canvas, _ = self._update(processed, self.canvas)
        if self.sampler == "confidence-threshold":
            bool(mx.all(self.revealed).item())
        g._diffusion_stable_and_confident(argmax, processed, self.history,
                                          dict(stability_threshold=1, confidence_threshold=0.005))
        self.signal = m.diffusion_self_conditioning(processed, self.context)
        mx.eval(canvas, self.signal)
        self.canvas = canvas


class MlxVlmEntropy(MlxVlm):
    def __init__(self, path):
        super().__init__(path, sampler="entropy-bound")


class Transformers:
    """transformers' from_pretrained model; its public sampler classes as in its generate loop."""

    def __init__(self, path, experts="grouped_mm", threads=1):
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as g

        torch.set_num_threads(int(threads))
        self.torch, self.g = torch, g
        prompt, canvas = inputs()
        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            path, experts_implementation=experts, dtype=torch.float32).eval()
        self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        with torch.no_grad():
            self.model.model.encoder(input_ids=torch.tensor(prompt), past_key_values=self.cache)
            self.canvas = torch.tensor(canvas)
            self.previous = self._logits(None) / T
        self.sc = None
        self.sampler = g.EntropyBoundSampler(g.EntropyBoundSamplerConfig(BOUND), CANVAS, SHAPE["vocab_size"], 48)
        self.parts = {"part:sampler": self._sampler_part}

    def _logits(self, sc):
        return self.model(decoder_input_ids=self.canvas, past_key_values=self.cache,
                          self_conditioning_logits=sc).logits

    def forward(self):
        with self.torch.no_grad():
            self._logits(None)

    def forward_sc(self):
        with self.torch.no_grad():
            self._logits(self.previous)

    def _sample(self, scaled):
        torch = self.torch
        probs = torch.softmax(scaled, dim=-1)
        sampled = torch.multinomial(probs.view(-1, probs.shape[-1]), 1).view(self.canvas.shape)
        accepted = self.sampler.accept_canvas(self.canvas, sampled, scaled, 1)
        torch.distributions.Categorical(logits=scaled).entropy().mean().item()
        return self.sampler.renoise_canvas(accepted, 1)

    def _sampler_part(self):
        with self.torch.no_grad():
            self._sample(self.previous)

    def step(self):
        with self.torch.no_grad():
            scaled = self._logits(self.sc) / T
            self.canvas = self._sample(scaled)
            self.sc = scaled


WORKERS = {"ours": Ours, "mlx-vlm": MlxVlm, "mlx-vlm-entropy": MlxVlmEntropy, "transformers": Transformers}
MLX_WORKERS = ("ours", "mlx-vlm", "mlx-vlm-entropy")


def serve(kind: str, path: str, extra: list[str]) -> None:
    """Worker loop: one command per stdin line, one JSON timing per stdout line."""
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not reach the pipe
    runner = WORKERS[kind](path, *extra)
    commands = {"forward": runner.forward, "forward_sc": runner.forward_sc, "step": runner.step, **runner.parts}
    out.write(json.dumps(sorted(commands)) + "\n")
    out.flush()
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        wall, cpu = time.perf_counter(), time.process_time()
        commands[name]()
        out.write(json.dumps(dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)) + "\n")
        out.flush()


class Worker:
    def __init__(self, label: str, kind: str, path: str, extra=()):
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        if kind in MLX_WORKERS:
            env["LD_PRELOAD"] = OPENBLAS
        self.label = label
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, "--path", path, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        self.commands = json.loads(self.proc.stdout.readline())

    def run(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died on {command}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def drive(workers: list[Worker], rounds: int, warmup: int) -> dict:
    """Every command of every worker, `warmup` untimed then `rounds` timed, interleaved."""
    times = {w.label: {c: {"wall": [], "cpu": []} for c in w.commands} for w in workers}
    order = list(workers)
    for r in range(warmup + rounds):
        random.Random(r).shuffle(order)
        for w in order:
            for command in w.commands:
                t = w.run(command)
                if r >= warmup:
                    times[w.label][command]["wall"].append(t["wall"])
                    times[w.label][command]["cpu"].append(t["cpu"])
        print(f"round {r + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    return times


def medians(times: dict) -> dict:
    return {w: {c: {k: statistics.median(v) for k, v in t.items()} for c, t in cs.items()} for w, cs in times.items()}


def report(med: dict, best_reference: str) -> str:
    ours = med["ours"]
    lines = ["| implementation | forward ms (wall / CPU) | forward + SC ms | whole step ms | "
             "ours / this: step wall | step CPU |", "|---|---|---|---|---|---|"]
    for name, m in med.items():
        if name.startswith("transformers") and name != best_reference:
            continue
        cell = lambda c: f"{1000 * m[c]['wall']:.0f} / {1000 * m[c]['cpu']:.0f}"
        lines.append(f"| {name} | {cell('forward')} | {cell('forward_sc')} | {cell('step')} | "
                     f"{ours['step']['wall'] / m['step']['wall']:.2f} | {ours['step']['cpu'] / m['step']['cpu']:.2f} |")
    lines += ["", "| implementation | part | ms wall | ms CPU |", "|---|---|---|---|"]
    for name, m in med.items():
        for c, v in m.items():
            if c.startswith("part:"):
                lines.append(f"| {name} | {c[5:]} | {1000 * v['wall']:.0f} | {1000 * v['cpu']:.0f} |")
    lines += ["", "transformers configurations (step ms wall / CPU): " + ", ".join(
        f"{n}: {1000 * m['step']['wall']:.0f} / {1000 * m['step']['cpu']:.0f}"
        for n, m in med.items() if n.startswith("transformers"))]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reference", nargs="+", default=["grouped_mm:1", "grouped_mm:2", "eager:1", "batched_mm:1"],
                        help="transformers configurations EXPERTS:THREADS, each its own worker")
    parser.add_argument("--skip", nargs="*", default=[], help="worker labels to leave out")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_bench.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.worker:
        return serve(args.worker, args.path, extra)
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"from step_bench import write_checkpoint; from pathlib import Path; "
                        f"write_checkpoint(Path({tmp!r}))"], check=True, env=env)
        specs = [("ours", "ours", ()), ("mlx-vlm", "mlx-vlm", ()), ("mlx-vlm entropy-bound", "mlx-vlm-entropy", ())]
        specs += [(f"transformers {c}", "transformers", tuple(c.split(":"))) for c in args.reference]
        workers = [Worker(label, kind, tmp, extra) for label, kind, extra in specs if label not in args.skip]
        load = os.getloadavg()
        times = drive(workers, args.rounds, args.warmup)
        for w in workers:
            w.close()
    med = medians(times)
    refs = [n for n in med if n.startswith("transformers")]
    best = min(refs, key=lambda n: med[n]["step"]["wall"]) if refs else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(load_before=load, load_after=os.getloadavg(), rounds=args.rounds,
                                        times=times, medians=med, best_reference=best), indent=1) + "\n")
    print(f"load average before {load}, after {os.getloadavg()}")
    print(report(med, best))


if __name__ == "__main__":
    main()
