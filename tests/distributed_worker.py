"""One rank of `test_distributed.py`, run under `mlx.launch --backend ring`.

Reads a job (JSON) naming model directories, prompts, canvases and reference logits, runs
the sharded model on them and writes what it saw to `<out>/rank<r>.json` (rank 0 also
writes the gathered logits as .npy). Any failure is written to `<out>/rank<r>.error`.
"""

import json
import sys
import traceback
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_diffusiongemma.loading as loading
from mlx_diffusiongemma import generate_step, load_model
from mlx_diffusiongemma.infill import surprises
from mlx_diffusiongemma.sharded_sample import sharded_sampler_step


def gather_vocab(logits: mx.array, vocab) -> mx.array:
    """Full-vocabulary logits from every rank's slice (for checking only: the sampler
    never does this)."""
    N = vocab.group.size()
    per = -(-vocab.size // N)
    pad = [(0, 0)] * (logits.ndim - 1) + [(0, per - logits.shape[-1])]
    parts = mx.distributed.all_gather(mx.pad(logits, pad)[None], group=vocab.group)
    full = mx.concatenate([parts[r] for r in range(N)], axis=-1)[..., : vocab.size]
    # Every rank must run the same collectives in the same order: evaluate here on all.
    mx.eval(full)
    return full


# The speed levers a sharded model takes beside the reference sampler, by name.
TOP_K = 5
LEVERS = {"confident": dict(sampler="confidence", threshold=0.9999), "topk": dict(self_conditioning_top_k=TOP_K)}


def canvas_logits(model, prompts, canvases, self_conditioned: bool, top_k: int | None = None) -> mx.array:
    """Logits of each (prompt, canvas), optionally for a second, self-conditioned step
    (from the `top_k` likeliest tokens only, if given)."""
    out = []
    for prompt, canvas in zip(prompts, canvases):
        cache = model.make_cache()
        model.encode(mx.array([prompt]), cache)
        logits = model.denoise(mx.array([canvas]), cache)
        if self_conditioned:
            logits = model.denoise(mx.array([canvas]), cache, logits * 1.25, self_conditioning_top_k=top_k)
        out.append(logits)
    return mx.concatenate(out, axis=0)


def committed(model, prompt, initial, settings) -> list[int]:
    tokens = []
    for event in generate_step(model, prompt, initial_canvas=initial, seed=0, **settings):
        if event.committed is not None:
            tokens += event.committed
    return tokens


def sampler_check(logits: np.ndarray, vocab, inv_t: float, bound: float) -> dict:
    """The sharded sampler step on this rank's slice of the same full logits."""
    full = mx.array(logits)
    keys = mx.random.split(mx.random.key(7))
    B, L, _ = full.shape
    pinned = mx.zeros((B, L), dtype=mx.bool_)
    local = full[..., vocab.start : vocab.stop]
    _, probs, argmax, canvas, accepted, entropy = sharded_sampler_step(
        local, mx.array(inv_t), mx.array(bound), keys, pinned, vocab)
    sampled = sharded_sampler_step(local, mx.array(inv_t), mx.array(1e9), keys, pinned, vocab)[3]
    return dict(entropy=entropy.tolist(), accepted=accepted.tolist(), argmax=argmax.tolist(),
                canvas=canvas.tolist(), sampled=sampled.tolist(),
                probs=np.array(gather_vocab(probs, vocab)).tolist(),
                confidence=vocab.values_at(probs, sampled).tolist())


def run(job: dict, out: Path, rank: int) -> dict:
    result = {}
    for name, spec in job["models"].items():
        model = load_model(spec["path"])
        vocab = model.vocab_shard
        assert vocab is not None, "load_model did not shard under mlx.launch"
        for sc in (False, True):
            logits = gather_vocab(canvas_logits(model, job["prompts"], job["canvases"], sc), vocab)
            if rank == 0:
                np.save(out / f"{name}_logits{'_sc' if sc else ''}.npy", np.array(logits))
        logits = gather_vocab(canvas_logits(model, job["prompts"], job["canvases"], True, TOP_K), vocab)
        if rank == 0:
            np.save(out / f"{name}_logits_topk.npy", np.array(logits))
        result[f"{name}_tokens"] = [committed(model, p, c, job["settings"]) for p, c in zip(job["prompts"], job["canvases"])]
        for lever, settings in LEVERS.items():
            result[f"{name}_{lever}_tokens"] = [committed(model, p, c, {**job["settings"], **settings})
                                                for p, c in zip(job["prompts"], job["canvases"])]
        # Two canvases' worth of tokens: the second block reads the first from the cache.
        result[f"{name}_surprises"] = [surprises(model, p, c + c[::-1]) for p, c in zip(job["prompts"], job["canvases"])]
        result[f"{name}_heads"] = [(l.self_attn.n_heads, l.self_attn.n_kv) for l in model.layers]
        if spec.get("sampler"):
            ref = np.load(job["sampler_logits"])
            result["sampler"] = sampler_check(ref, vocab, *job["sampler_settings"])
        if spec.get("in_memory"):
            # The same model loaded whole on this rank, then `Model.shard`: the same logits.
            group, world_group = vocab.group, loading.world_group
            loading.world_group = lambda: None
            whole = load_model(spec["path"])
            loading.world_group = world_group
            whole.shard(group)
            logits = gather_vocab(canvas_logits(whole, job["prompts"], job["canvases"], False), vocab)
            if rank == 0:
                np.save(out / f"{name}_in_memory_logits.npy", np.array(logits))
    return result


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    group = mx.distributed.init(strict=True, backend="ring")
    rank = group.rank()
    try:
        result = run(job, out, rank)
        result["size"] = group.size()
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException as e:
        (out / f"rank{rank}.error").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise


if __name__ == "__main__":
    main()
