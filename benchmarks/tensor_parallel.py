"""Tensor parallelism: bytes communicated, memory per rank and step time.

    python benchmarks/tensor_parallel.py                        # 1 rank (unsharded)
    mlx.launch --backend ring -n 2 --hosts 127.0.0.1 python benchmarks/tensor_parallel.py

Two parts, both on every rank count:
- A bench model (random float32 weights, written once to --model-dir) loaded sharded:
  median time of a denoising step (decoder forward + sampler) and of encoding the prompt,
  the bytes handed to collectives per step and per encoded token, the bytes this rank's
  sockets really sent (`ss`, ring backend), parameter bytes and peak memory per rank.
- The released 26B-A4B architecture (config.json from the reference folder) at 4 bits,
  built lazily and never run: the collectives the real code path issues for one 256-token
  denoising step and one 512-token encoder chunk are counted from the graph, and its
  parameter bytes per rank from the sharded arrays' shapes.
Rank 0 prints one JSON line (and writes it to --out).
"""

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_diffusiongemma import UserError, load_model
from mlx_diffusiongemma.models import Model, ModelArgs
from mlx_diffusiongemma.models.sharding import TRAFFIC, world_group
from mlx_diffusiongemma.models.tiny import tiny_config
from mlx_diffusiongemma.sample import sampler_step
from mlx_diffusiongemma.sharded_sample import sharded_sampler_step

RELEASE = Path("/work/shared/reference/diffusiongemma-26B-A4B-it")
# The release's shape at a small size: widths that need padding (528 = 8.25 groups of 64,
# 176 = 2.75), 12 heads over 6 KV heads (full layers: 1, replicated), an uneven vocabulary.
BENCH = dict(hidden_size=256, intermediate_size=528, moe_intermediate_size=176, num_attention_heads=12,
             num_key_value_heads=6, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
             num_experts=16, top_k_experts=4, vocab_size=8000, sliding_window=64,
             num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)


def traffic() -> dict:
    return {k: TRAFFIC[k] for k in ("all_sum", "all_sum_calls", "all_gather", "all_gather_calls")}


def delta(before: dict) -> dict:
    return {k: v - before[k] for k, v in traffic().items()}


def socket_bytes_sent() -> int | None:
    """Bytes this process's TCP sockets have sent (from `ss`), or None where unavailable."""
    import os

    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            mine = f"pid={os.getpid()}," in line
        elif mine:
            m = re.search(r"bytes_sent:(\d+)", line)
            total += int(m.group(1)) if m else 0
    return total


def step(model, canvas, cache, scaled, probs):
    """One denoising step: decoder forward then the (sharded) sampler."""
    logits = model.denoise(canvas, cache, scaled, self_conditioning_probs=probs)
    B, L = canvas.shape
    args = (logits, mx.array(1 / 0.8), mx.array(0.1), mx.random.split(mx.random.key(1)), mx.zeros((B, L), dtype=mx.bool_))
    vocab = model.vocab_shard
    out = sampler_step(*args) if vocab is None else sharded_sampler_step(*args, vocab=vocab)
    return out[0], out[1], out[3]


def write_bench_model(path: Path, canvas: int) -> None:
    """A random bench checkpoint in the converted layout (config.json + one safetensors)."""
    config = tiny_config(canvas_length=canvas, vision=False, **BENCH)
    mx.random.seed(0)
    model = Model(ModelArgs.from_config(config), text_only=True)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))


def bench_model(group, model_dir: Path, prompt_len: int, canvas: int, steps: int) -> dict:
    if (group is None or group.rank() == 0) and not (model_dir / "config.json").is_file():
        write_bench_model(model_dir, canvas)
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # rank 0 has written it
    mx.reset_peak_memory()
    model = load_model(model_dir)  # shards under mlx.launch: each rank reads its slices only
    load_peak = mx.get_peak_memory()
    params = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    ids = mx.random.randint(0, BENCH["vocab_size"], (1, prompt_len), key=mx.random.key(2))
    canvas_ids = mx.random.randint(0, BENCH["vocab_size"], (1, canvas), key=mx.random.key(3))
    encode_times = []
    for _ in range(2):
        cache = model.make_cache()
        before, tic = traffic(), time.perf_counter()
        model.encode(ids, cache)
        encode_times.append(time.perf_counter() - tic)
        encoded = delta(before)
    # The first step compiles and has no self-conditioning: it is left out of every figure.
    scaled, probs, canvas_ids = step(model, canvas_ids, cache, None, None)
    mx.eval(scaled, probs, canvas_ids)
    times, sent_before, before = [], socket_bytes_sent(), traffic()
    for _ in range(steps):
        tic = time.perf_counter()
        scaled, probs, canvas_ids = step(model, canvas_ids, cache, scaled, probs)
        mx.eval(scaled, probs, canvas_ids)
        times.append(time.perf_counter() - tic)
    per_step = {k: v / steps for k, v in delta(before).items()}
    sent = socket_bytes_sent()
    return dict(
        config=BENCH, prompt_tokens=prompt_len, canvas=canvas, parameter_bytes=params,
        peak_memory_after_load_bytes=load_peak, peak_memory_bytes=mx.get_peak_memory(), step_seconds_median=statistics.median(times),
        encode_seconds=min(encode_times), per_step=per_step,
        per_encoded_token={k: v / prompt_len for k, v in encoded.items() if not k.endswith("calls")},
        socket_bytes_sent_per_step=None if sent is None or sent_before is None else (sent - sent_before) / steps,
    )


def release_count(group, bits: int = 4) -> dict:
    """Collective bytes and parameter bytes per rank of the released architecture at `bits`
    (experts) / 8 (the rest), from lazily built arrays that are never evaluated."""
    config = json.loads((RELEASE / "config.json").read_text())
    generation = json.loads((RELEASE / "generation_config.json").read_text())
    model = Model(ModelArgs.from_config(config, generation), text_only=True)
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=bits, class_predicate=model.quant_predicate)
    unsharded = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    if group is not None:
        model.shard(group)
    params = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    model.moe_grouped = False  # the grouped path reads the routing on the host (evaluates)
    L = model.args.canvas_length
    cache = model.make_cache()
    before = traffic()
    model.encode_chunk(mx.zeros((1, 512), dtype=mx.int32), cache)
    encoded = delta(before)
    before = traffic()
    vocab = model.vocab_shard
    V = model.args.vocab_size if vocab is None else vocab.stop - vocab.start
    # A self-conditioned step (every step after a canvas's first): the bf16 model rebuilds
    # the softmax of the previous logits from shards, then embeds it.
    step(model, mx.zeros((1, L), dtype=mx.int32), cache, mx.zeros((1, L, V)), None)
    per_step = delta(before)
    return dict(canvas=L, parameter_bytes_unsharded=unsharded, parameter_bytes=params, per_step=per_step,
                per_encoded_token={k: v / 512 for k, v in encoded.items() if not k.endswith("calls")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tensor_parallel_bench_model"),
                        help="the bench checkpoint (written on first use)")
    parser.add_argument("--release-only", action="store_true", help="only count the released architecture")
    args = parser.parse_args()
    group = world_group()
    result = dict(ranks=1 if group is None else group.size())
    if not args.release_only:
        result["bench"] = bench_model(group, args.model_dir, args.prompt_tokens, args.canvas, args.steps)
    try:
        result["release_4bit"] = release_count(group)
    except UserError as e:  # 16 heads do not split over 3 ranks
        result["release_4bit"] = {"error": str(e)}
    if group is None or group.rank() == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
