"""Time one denoising step (canvas 256 after a 512-token prompt, float32) for this port,
the transformers reference and mlx-vlm on the same random checkpoint, side by side.

A step is the decoder forward with self-conditioning plus the entropy-bounded sampler
(temperature, full-vocabulary sampling, entropy, acceptance, renoising). The three are
timed round-robin in one process so machine noise hits them alike; ratios are reported
for wall time and for CPU time (all threads), which other load on the machine distorts less.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python benchmarks/step_time.py --rounds 5
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

from mlx_diffusiongemma.models.tiny import tiny_config

SHAPE = dict(
    vocab_size=32768, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    global_head_dim=128, num_global_key_value_heads=2,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=1024,
    num_experts=32, top_k_experts=4, max_position_embeddings=8192,
)
CANVAS, PROMPT, T, BOUND = 256, 512, 0.6, 0.1


def write_checkpoint(path: Path):
    """A random reference model, saved with the released config.json field names."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    # The shared tiny config (its tiny vision tower keeps the checkpoint small) at this preset's sizes.
    tiny = tiny_config(CANVAS, **SHAPE)
    config = DiffusionGemmaConfig(text_config=tiny["text_config"], vision_config=tiny["vision_config"],
                                  canvas_length=CANVAS)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    text.pop("per_layer_config")  # mlx-vlm reads only the released global_* fields
    text.update(global_head_dim=SHAPE["global_head_dim"], num_global_key_value_heads=SHAPE["num_global_key_value_heads"])
    (path / "config.json").write_text(json.dumps(config))
    return model


class Ours:
    name = "mlx-diffusiongemma"

    def __init__(self, path, prompt, canvas):
        from mlx_diffusiongemma import load_model

        self.model = load_model(path)
        self.cache = self.model.make_cache()
        self.model.encode(mx.array(prompt), self.cache)
        self.canvas = mx.array(canvas)
        self.sc = (None, None)

    def step(self):
        from mlx_diffusiongemma.sample import sampler_step

        logits = self.model.denoise(self.canvas, self.cache, self.sc[0], self_conditioning_probs=self.sc[1])
        keys = mx.random.split(mx.random.key(0))
        scaled, probs, _, canvas, _, entropy = sampler_step(logits, mx.array(1 / T), mx.array(BOUND), keys)
        mx.eval(canvas, scaled, probs, entropy.mean())
        self.sc = (scaled, probs)


class MlxVlm:
    """mlx-vlm's model through its public diffusion methods, with the reference sampler
    written plainly in MLX (mlx-vlm's own sampler helpers are private)."""

    name = "mlx-vlm"

    def __init__(self, path, prompt, canvas):
        from mlx_vlm.utils import load_model

        self.model = load_model(Path(path))
        self.cache = self.model.diffusion_prefill_cache(
            mx.array(prompt), attention_mask=None, cache=self.model.make_cache(), pixel_values=None,
            mm_token_type_ids=None, prefill_step_size=None, chunk_prefill=False,
        )
        self.canvas = mx.array(canvas)
        self.signal = None

    def step(self):
        m = self.model
        logits = m.diffusion_decoder_logits(self.canvas, self.cache, self_conditioning=self.signal)
        scaled = logits / T
        sampled = mx.random.categorical(scaled)
        logp = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        entropy = -(mx.exp(logp) * logp).sum(-1)
        order = mx.argsort(entropy, axis=-1)
        sorted_h = mx.take_along_axis(entropy, order, axis=-1)
        accept = mx.put_along_axis(mx.zeros_like(entropy, dtype=mx.bool_), order,
                                   (mx.cumsum(sorted_h, -1) - sorted_h) <= BOUND, axis=-1)
        noise = mx.random.randint(0, logits.shape[-1], self.canvas.shape)
        self.canvas = mx.where(accept, sampled, noise).astype(self.canvas.dtype)
        self.signal = m.diffusion_self_conditioning(scaled, m.diffusion_prepare_self_conditioning())
        mx.eval(self.canvas, self.signal, entropy.mean())


class Reference:
    """transformers' forward plus its public sampler classes, as in its generate loop."""

    name = "transformers"

    def __init__(self, model, prompt, canvas):
        from transformers import DynamicCache
        from transformers.models.diffusion_gemma import generation_diffusion_gemma as g

        self.model, self.g = model, g
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        with torch.no_grad():
            model.model.encoder(input_ids=torch.tensor(prompt), past_key_values=self.cache)
        self.canvas = torch.tensor(canvas)
        self.sc = None
        self.sampler = g.EntropyBoundSampler(g.EntropyBoundSamplerConfig(BOUND), CANVAS, SHAPE["vocab_size"], 48)

    @torch.no_grad()
    def step(self):
        logits = self.model(decoder_input_ids=self.canvas, past_key_values=self.cache,
                            self_conditioning_logits=self.sc).logits
        scaled = logits / T
        probs = torch.softmax(scaled, dim=-1)
        sampled = torch.multinomial(probs.view(-1, probs.shape[-1]), 1).view(self.canvas.shape)
        accepted = self.sampler.accept_canvas(self.canvas, sampled, scaled, 1)
        self.canvas = self.sampler.renoise_canvas(accepted, 1)
        torch.distributions.Categorical(logits=scaled).entropy().mean().item()
        self.sc = scaled


def time_round_robin(runners, rounds: int, warmup: int = 2) -> dict[str, dict[str, list[float]]]:
    for r in runners:
        for _ in range(warmup):
            r.step()
    times = {r.name: {"wall": [], "cpu": []} for r in runners}
    for _ in range(rounds):
        for r in runners:
            wall, cpu = time.perf_counter(), time.process_time()
            r.step()
            times[r.name]["wall"].append(time.perf_counter() - wall)
            times[r.name]["cpu"].append(time.process_time() - cpu)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.RandomState(0)
    prompt, canvas = rng.randint(0, SHAPE["vocab_size"], (1, PROMPT)), rng.randint(0, SHAPE["vocab_size"], (1, CANVAS))
    with tempfile.TemporaryDirectory() as tmp:
        ref = write_checkpoint(Path(tmp))
        runners = [Ours(tmp, prompt, canvas), MlxVlm(tmp, prompt, canvas), Reference(ref, prompt, canvas)]
        times = time_round_robin(runners, args.rounds)
    for kind in ("wall", "cpu"):
        medians = {name: statistics.median(t[kind]) for name, t in times.items()}
        ours = medians[Ours.name]
        for name, m in medians.items():
            runs = [round(t, 2) for t in times[name][kind]]
            print(f"{kind:4s} {name:20s} median {m:.3f} s/step  ours/this = {ours / m:.2f}  runs {runs}")


if __name__ == "__main__":
    main()
