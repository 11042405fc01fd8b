"""Peak memory of the full-size model at the default 4-bit recipe, text only.

Builds the model from the released config.json, quantizes it exactly as a converted
checkpoint is loaded (the converter's plan -> config `quantization` block ->
`apply_quantization`), fills the quantized weights with random bits layer by layer (no
bf16 copy of the model ever exists), then runs a 64-token prefill and one denoising step
of a full 256-token canvas. Needs ~16 GB of free memory: run it alone.

    python benchmarks/full_size_memory.py                  # the real thing (Mac / GPU)
    python benchmarks/full_size_memory.py --build-only     # weights resident, no forward
    python benchmarks/full_size_memory.py --layers 2       # activations, on a slow CPU

On a CPU without fast bf16 quantized kernels the 30-layer forward takes hours; there
`--layers 2` measures the activations' share of the peak on the full-width model cut to
two layers (one sliding, one full; activations do not grow with depth) and `--build-only`
the weights of all 30. Float32 (`--dtype float32`) runs ~10x faster on such a CPU but its
activations differ from bf16 ones.
"""

import argparse
import json
import math
import resource
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from common import RELEASE
from mlx.utils import tree_flatten, tree_map

from mlx_diffusiongemma.convert import (
    plan_conversion,
    quantization_block,
    recipe_default,
)
from mlx_diffusiongemma.loading import apply_quantization, expected_shapes
from mlx_diffusiongemma.models import Model, ModelArgs
from mlx_diffusiongemma.weights.safetensors import TensorInfo

PROMPT, CANVAS = 64, 256


def quantized_skeleton(layers: int | None = None, layer_types: list[str] | None = None,
                       vocab_size: int | None = None) -> Model:
    """The text-only model with the layers the default recipe quantizes swapped for quantized
    ones, decided by the converter's plan; nothing is evaluated yet. `layers` keeps only
    the last that many layers of the released pattern, `layer_types` sets the pattern
    outright; `vocab_size` shrinks the vocabulary (for per-layer measurements, which do
    not depend on it)."""
    config = json.loads((RELEASE / "config.json").read_text())
    generation = json.loads((RELEASE / "generation_config.json").read_text())
    text = config["text_config"]
    if layers:
        layer_types = text["layer_types"][-layers:]
    if layer_types:
        text["layer_types"] = list(layer_types)
        text["num_hidden_layers"] = len(layer_types)
    if vocab_size:
        text["vocab_size"] = vocab_size
    model = Model(ModelArgs.from_config(config, generation), text_only=True)
    infos = {
        name: TensorInfo(name, "BF16", shape, RELEASE / "none", 0, 2 * math.prod(shape))
        for name, shape in expected_shapes(model).items()
    }
    plans = plan_conversion(model, infos)
    stored = {t.name for p in plans for t in p.outputs}
    apply_quantization(model, quantization_block(plans, recipe_default(4, 64, "mixed")), stored)
    return model


def fill_random(module: nn.Module, dtype: mx.Dtype) -> None:
    """Random packed weights with scales giving a ~0.02 spread; float parameters in `dtype`."""
    for _, m in module.named_modules():
        if "scales" in m:
            levels = 2**m.bits - 1
            scale = 0.02 / (levels / math.sqrt(12))
            m.weight = mx.random.randint(0, 2**31 - 1, m.weight.shape, dtype=mx.int32).view(mx.uint32)
            m.scales = mx.full(m.scales.shape, scale, dtype)
            m.biases = mx.full(m.biases.shape, -scale * levels / 2, dtype)
    floats = tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, module.parameters())
    module.update(floats)


def build(layers: int | None, dtype: mx.Dtype, **skeleton) -> Model:
    model = quantized_skeleton(layers, **skeleton)
    decoder = model.model.decoder
    parts = [decoder.embed_tokens, decoder.norm, decoder.self_conditioning, model.model.encoder, *decoder.layers]
    for part in parts:
        fill_random(part, dtype)
        mx.eval(part.parameters())
        mx.clear_cache()
    return model


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the build's transients are not counted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers (default: all 30)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    model = build(args.layers, getattr(mx, args.dtype))
    weights = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    print(f"{len(model.layers)} layers, {args.dtype}, built in {time.perf_counter() - start:.0f} s: "
          f"weights {weights / 1e9:.2f} GB, MLX active {mx.get_active_memory() / 1e9:.2f} GB, "
          f"peak RSS so far {peak_rss() / 1e9:.2f} GB", flush=True)
    if args.build_only:
        return
    mx.clear_cache()
    mx.reset_peak_memory()
    reset = reset_peak_rss()
    ids = mx.random.randint(0, model.args.vocab_size, (1, PROMPT + CANVAS))
    cache = model.make_cache()
    start = time.perf_counter()
    model.encode(ids[:, :PROMPT], cache)
    prefill = time.perf_counter() - start
    print(f"prefill {PROMPT} tokens: {prefill:.1f} s", flush=True)
    start = time.perf_counter()
    logits = model.denoise(ids[:, PROMPT:], cache)
    mx.eval(logits)
    step = time.perf_counter() - start
    assert logits.shape == (1, CANVAS, model.args.vocab_size)
    peak = mx.get_peak_memory()
    print(f"one {CANVAS}-token denoising step: {step:.1f} s (this CPU; not a Mac figure)")
    print(f"peak MLX memory: {peak / 1e9:.2f} GB ({peak / 2**30:.2f} GiB) = weights {weights / 1e9:.2f} GB "
          f"+ activations {(peak - weights) / 1e9:.2f} GB")
    label = "peak RSS during inference" if reset else "peak RSS including the build"
    print(f"{label}: {peak_rss() / 1e9:.2f} GB ({peak_rss() / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
