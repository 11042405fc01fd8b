"""Convert a random multi-shard bf16 checkpoint and record peak memory and throughput.

The checkpoint keeps the released model's widths (hidden 2816, 128 experts, vocab 262,144)
with fewer layers and no vision tower, so every tensor has a real size: about 4.7 GB for
two layers. It is written with mx.save_safetensors in one child process, converted in
another child per recipe (which reports its own peak RSS), and deleted afterwards. Linux
carries a parent's peak RSS into a forked child's ru_maxrss, so the parent stays small.

    python benchmarks/convert_benchmark.py --workdir /tmp/convert-bench
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from common import RELEASE

from mlx_diffusiongemma.loading import expected_shapes
from mlx_diffusiongemma.models import Model, ModelArgs
from mlx_diffusiongemma.weights.safetensors import INDEX_NAME

RECIPES = {"mixed 4-bit (default)": {}, "8-bit": {"recipe": "8bit"}, "bf16, no quantization": {"quantize": False}}

CHILD = """
import json, resource, sys, time
import mlx.core as mx
from mlx_diffusiongemma.convert import convert
start = time.perf_counter()
convert(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "mlx_peak": mx.get_peak_memory()}))
"""


def small_config(layers: int) -> dict:
    config = json.loads((RELEASE / "config.json").read_text())
    text = config["text_config"]
    text["num_hidden_layers"] = layers
    text["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    config.pop("vision_config")
    return config


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> mx.array:
    # Random mantissas and signs with exponents of magnitude ~0.01-0.1: cheap, finite bf16.
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    bits = (bits & 0x807F) | (((bits >> 7) & 0x3) + 120).astype(np.uint16) << 7
    return mx.array(bits).view(mx.bfloat16)


def hf_name(name: str) -> str:
    return name.removesuffix(".weight") if ".experts." in name else name


def write_checkpoint(path: Path, layers: int, shard_bytes: int) -> int:
    """Write the random checkpoint in shards of at most `shard_bytes`; return its size."""
    path.mkdir(parents=True)
    config = small_config(layers)
    (path / "config.json").write_text(json.dumps(config))
    shutil.copy(RELEASE / "generation_config.json", path / "generation_config.json")
    shapes = expected_shapes(Model(ModelArgs.from_config(config)))
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, names in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        mx.save_safetensors(str(path / shard), {hf_name(n): random_bf16(shapes[n], rng) for n in names},
                            metadata={"format": "pt"})
        weight_map.update({hf_name(n): shard for n in names})
    total = sum(2 * math.prod(s) for s in shapes.values())
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def run_recipe(src: Path, out: Path, settings: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), json.dumps(settings)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoint")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    src = args.workdir / "random-bf16"
    if args.write_only:
        write_checkpoint(src, args.layers, int(args.shard_gb * 1e9))
        return
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--write-only", *sys.argv[1:]], check=True)
    total = json.loads((src / INDEX_NAME).read_text())["metadata"]["total_size"]
    shards = sorted(src.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    print(f"input: {total / 1e9:.2f} GB in {len(shards)} shards, largest {largest / 1e9:.2f} GB "
          f"(written in {time.perf_counter() - start:.0f} s)")
    print("| recipe | output GB | seconds | GB/s of input | peak RSS GB | peak RSS / largest shard | MLX peak GB |")
    print("|---|---|---|---|---|---|---|")
    try:
        for name, settings in RECIPES.items():
            out = args.workdir / "converted"
            r = run_recipe(src, out, settings)
            size = sum(p.stat().st_size for p in out.iterdir())
            print(f"| {name} | {size / 1e9:.2f} | {r['seconds']:.1f} | {total / 1e9 / r['seconds']:.2f} | "
                  f"{r['peak_rss'] / 1e9:.2f} | {r['peak_rss'] / largest:.2f} | {r['mlx_peak'] / 1e9:.2f} |", flush=True)
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(src)


if __name__ == "__main__":
    main()
