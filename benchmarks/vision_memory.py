"""Peak memory of the full-size Gemma 4 vision tower for one image at the largest patch budget.

Builds the tower and its embedder from the released config.json (27 layers, width 1152)
with random weights, prepares one image that fills the budget exactly (1120 soft tokens:
84 x 120 patches of 16 px, a 1344 x 1920 image) and runs it through the tower once,
reporting MLX's peak memory minus the weights (the activations).

    python benchmarks/vision_memory.py                              # all 27 layers, bf16 (Mac / GPU)
    python benchmarks/vision_memory.py --layers 1 --dtype float32   # activations, on a slow CPU

Activations do not grow with depth (each layer's intermediates are freed before the
next), so `--layers 1` measures them on a CPU where 27 full-width layers take too long.
`--query-chunk` sets how many query rows one attention call takes (0: all at once).
"""

import argparse
import json
import resource
import time

import mlx.core as mx
import numpy as np
from common import RELEASE
from mlx.utils import tree_flatten, tree_map
from PIL import Image

from mlx_diffusiongemma.images import prepare_image
from mlx_diffusiongemma.models.vision import VisionEmbedder, VisionTower


def build(layers: int, dtype: mx.Dtype) -> tuple[VisionTower, VisionEmbedder, dict]:
    config = json.loads((RELEASE / "config.json").read_text())
    cfg = dict(config["vision_config"], num_hidden_layers=layers)
    tower, embed = VisionTower(cfg), VisionEmbedder(cfg, config["text_config"]["hidden_size"])
    for module in (tower, embed):
        module.update(tree_map(lambda p: (0.02 * mx.random.normal(p.shape)).astype(dtype), module.parameters()))
        mx.eval(module.parameters())
    return tower, embed, cfg


def nbytes(*modules) -> int:
    return sum(p.nbytes for m in modules for _, p in tree_flatten(m.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--budget", type=int, default=1120, help="soft tokens per image")
    parser.add_argument("--query-chunk", type=int, default=None, help="query rows per attention call (0: all)")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    tower, embed, cfg = build(args.layers, dtype)
    if args.query_chunk is not None:
        tower.query_chunk = args.query_chunk or None
    weights = nbytes(tower, embed)
    per_layer = nbytes(tower.encoder.layers[0])
    full_weights = weights + (27 - args.layers) * per_layer
    rng = np.random.RandomState(0)
    image = prepare_image(Image.fromarray(rng.randint(0, 256, (1344, 1920, 3), dtype=np.uint8)), args.budget)
    pixels, positions = mx.array(image.pixels), mx.array(image.positions)
    mx.eval(pixels, positions)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tic = time.perf_counter()
    features = embed(tower(pixels[None], positions[None], image.grid))
    mx.eval(features)
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    print(json.dumps(dict(
        layers=args.layers, dtype=args.dtype, patches=int(image.pixels.shape[0]), soft_tokens=image.soft_tokens,
        query_chunk=tower.query_chunk, weights_gb=round(weights / 1e9, 3),
        weights_27_layers_gb=round(full_weights / 1e9, 3), peak_gb=round(peak / 1e9, 3),
        activations_gb=round((peak - base) / 1e9, 3), features_mb=round(features.nbytes / 1e6, 2),
        seconds=round(seconds, 1), peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    )))


if __name__ == "__main__":
    main()
