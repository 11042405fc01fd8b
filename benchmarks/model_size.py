"""Size of the converted 26B model under each recipe, on paper.

Builds the model from the released config.json (no weights), describes every released
tensor from `tensor_shapes.json` and the released index, and runs the converter's own
planning (`plan_conversion`, i.e. the model's quant_predicate) to count output bytes.

    python benchmarks/model_size.py
"""

import json
import math

from common import RELEASE

from mlx_diffusiongemma.convert import plan_conversion
from mlx_diffusiongemma.loading import expected_shapes
from mlx_diffusiongemma.models import Model, ModelArgs
from mlx_diffusiongemma.weights.checks import check_tensors
from mlx_diffusiongemma.weights.safetensors import INDEX_NAME, TensorInfo

RECIPES = {
    "mixed 4-bit (default: experts 4-bit, rest 8-bit g64)": dict(q_bits=4),
    "mixed 3-bit experts": dict(q_bits=3),
    "mixed 5-bit experts": dict(q_bits=5),
    "mixed 6-bit experts": dict(q_bits=6),
    "8-bit everywhere (--recipe 8bit)": dict(recipe="8bit"),
    "bfloat16 / float16, no quantization": dict(quantize=False, dtype="bfloat16"),
    "float32, no quantization": dict(quantize=False, dtype="float32"),
}
MLX_COMMUNITY_4BIT = 14.5e9


def released_infos() -> dict[str, TensorInfo]:
    """Every released tensor as a header would describe it (offsets per shard, in index order)."""
    shapes = json.loads((RELEASE / "tensor_shapes.json").read_text())
    weight_map = json.loads((RELEASE / INDEX_NAME).read_text())["weight_map"]
    offsets: dict[str, int] = {}
    infos = {}
    for name, shard in weight_map.items():
        shape = tuple(shapes[name])
        size = 2 * math.prod(shape)
        start = offsets.get(shard, 0)
        infos[name] = TensorInfo(name, "BF16", shape, RELEASE / shard, start, start + size)
        offsets[shard] = start + size
    return infos


def planned_bytes(text_only: bool, settings: dict) -> int:
    config = json.loads((RELEASE / "config.json").read_text())
    model = Model(ModelArgs.from_config(config), text_only=text_only)
    infos = model.sanitize(released_infos())
    check_tensors(infos, expected_shapes(model))
    return sum(p.nbytes for p in plan_conversion(model, infos, **settings))


def main() -> None:
    total = json.loads((RELEASE / INDEX_NAME).read_text())["metadata"]["total_size"]
    print(f"released checkpoint: {total / 1e9:.2f} GB bf16\n")
    print("| recipe | with vision tower GB (GiB) | text-only GB (GiB) |")
    print("|---|---|---|")
    for name, settings in RECIPES.items():
        full, text = planned_bytes(False, settings), planned_bytes(True, settings)
        print(f"| {name} | {full / 1e9:.2f} ({full / 2**30:.2f}) | {text / 1e9:.2f} ({text / 2**30:.2f}) |")
    print(f"\nmlx-community 4-bit (mlx-vlm recipe), as reported: ~{MLX_COMMUNITY_4BIT / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
