"""GPU check, prepared but not yet run: one denoising step of the full-size model for this
port and for mlx-vlm, plus the shipped Sudoku model's tokens/s, default and fast mode.

Needs an NVIDIA GPU with `mlx[cuda]` (`pip install "mlx[cuda]"`; about 17 GB of GPU
memory per model, built one after the other) or a Mac. Both models are built from the
released `config.json` (tests/data), text only, with the mixed 4-bit recipe (experts at
4 bits, the rest at 8 bits, group 64): the packed weights are filled with random bits
module by module (`full_size_memory.fill_random`), so no bf16 copy of the model is ever
made. Same 512-token prompt, one 256-token canvas, one process, mlx-vlm second.

    python benchmarks/gpu_full_size.py --out benchmarks/results/gpu_full_size.json

Runs in a few minutes on a GPU: two builds, 2 + `--steps` steps each, 20 Sudoku puzzles
per mode. `--layers 2` shrinks both models to two layers for a smoke test on a CPU.
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from common import RELEASE
from full_size_memory import build, fill_random

PROMPT, CANVAS = 512, 256


def timed_steps(step, n: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(n):
        tic = time.perf_counter()
        step()
        out.append(time.perf_counter() - tic)
    return out


def ours(args, prompt) -> dict:
    """This port: whole steps through `generate_step` (its stop test disabled)."""
    from mlx_diffusiongemma import generate_step

    model = build(args.layers, mx.bfloat16)
    steps = generate_step(model, prompt, seed=0, max_denoising_steps=10**6, confidence_threshold=1e-30,
                          max_tokens=CANVAS)
    tic = time.perf_counter()
    next(steps)  # prefill + the first step
    first = time.perf_counter() - tic
    times = timed_steps(lambda: next(steps), args.steps)
    out = dict(prefill_and_first_step_s=first, step_ms=1000 * statistics.median(times),
               peak_gb=mx.get_peak_memory() / 1e9)
    steps.close()
    del model
    mx.clear_cache()
    return out


def mlx_vlm_model(layers: int | None):
    """mlx-vlm's DiffusionGemma from the released config, quantized like its mlx-community
    conversions, packed weights filled with random bits part by part."""
    from mlx_vlm.models import diffusion_gemma as arch

    config = json.loads((RELEASE / "config.json").read_text())
    if layers:
        text = config["text_config"]
        text["layer_types"] = text["layer_types"][-layers:]
        text["num_hidden_layers"] = layers
    config["vision_config"] = config.get("vision_config") or {}
    model = arch.Model(arch.ModelConfig.from_dict(config))
    predicate = model.quant_predicate

    def quantize_text(path, m):
        return not path.startswith(("vision", "model.encoder.vision", "embed_vision")) and predicate(path, m)

    nn.quantize(model, group_size=64, bits=4, class_predicate=quantize_text)
    for part in model.children().values():
        for sub in (part if isinstance(part, list) else [part]):
            if isinstance(sub, nn.Module):
                fill_random(sub, mx.bfloat16)
                mx.eval(sub.parameters())
                mx.clear_cache()
    return model


def mlx_vlm(args, prompt) -> dict:
    """mlx-vlm: its decoder plus the sampler helpers of its generation loop, at its
    defaults (benchmarks/step_bench.py's `MlxVlm.step`)."""
    from step_bench import MlxVlm

    runner = MlxVlm.from_model(mlx_vlm_model(args.layers), prompt, mx.random.randint(0, 262144, (1, CANVAS)))
    times = timed_steps(runner.step, args.steps)
    out = dict(step_ms=1000 * statistics.median(times), peak_gb=mx.get_peak_memory() / 1e9)
    del runner
    mx.clear_cache()
    return out


def sudoku(n: int) -> dict:
    """Tokens/s of the shipped Sudoku model, batch 1, default and fast mode."""
    from mlx_diffusiongemma.demos.sudoku import puzzles
    from mlx_diffusiongemma.demos.sudoku.solver import DEFAULT_MODEL, stream_solve
    from mlx_diffusiongemma.loading import load

    model, tokenizer = load(str(DEFAULT_MODEL))
    cases = puzzles.make_dataset(7_000_040, n, 40)
    out = {}
    for mode, settings in (("default", {}), ("fast", dict(fast=True))):
        tokens, forwards, seconds = 0, 0, 0.0
        for i, (puzzle, _) in enumerate(cases):
            tic = time.perf_counter()
            for last in stream_solve(puzzle, model, tokenizer, seed=i, **settings):
                pass
            seconds += time.perf_counter() - tic
            tokens, forwards = tokens + last.generation_tokens, forwards + last.decoder_forwards
        out[mode] = dict(tokens_per_s=tokens / seconds, forwards_per_puzzle=forwards / n)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers (smoke test)")
    parser.add_argument("--sudoku", type=int, default=20, help="puzzles per mode")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_full_size.json"))
    args = parser.parse_args()
    mx.random.seed(0)
    prompt = mx.random.randint(0, 262144, (PROMPT,)).tolist()
    result = dict(device=str(mx.default_device()), layers=args.layers or 30)
    result["ours"] = ours(args, prompt)
    print("ours", result["ours"], flush=True)
    mx.reset_peak_memory()
    result["mlx-vlm"] = mlx_vlm(args, prompt)
    print("mlx-vlm", result["mlx-vlm"], flush=True)
    result["ours / mlx-vlm step"] = result["ours"]["step_ms"] / result["mlx-vlm"]["step_ms"]
    if args.sudoku:
        result["sudoku"] = sudoku(args.sudoku)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    assert math.isfinite(result["ours / mlx-vlm step"])


if __name__ == "__main__":
    main()
