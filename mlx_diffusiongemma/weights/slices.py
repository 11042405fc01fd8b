"""Sharded loading: each rank reads only its pieces of the split tensors.

Tensors are mapped from the safetensors files at their validated offsets (`TensorInfo`)
with numpy's memmap; only the pieces a `ShardPlan` names are copied into memory, so a rank
holds its part of every split weight and never the whole tensor.
"""

import hashlib
import json

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..models.sharding import Piece, ShardPlan, all_gather, apply_plan, array_cut, make_plan
from .safetensors import TensorInfo

# Safetensors dtypes read as numpy; bf16 has no numpy type and is read as its bits.
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I32": np.int32,
          "U8": np.uint8, "I8": np.int8, "I64": np.int64, "U16": np.uint16, "I16": np.int16}


def read_tensor(info: TensorInfo, axis: int = 0, pieces: tuple[Piece, ...] = ()) -> mx.array:
    """The tensor `info` describes, or only `pieces` of it along `axis` (zero-padded)."""
    if info.dtype not in _NUMPY:
        raise UserError(f"{info.file}: {info.name} has dtype {info.dtype}, which sharded loading cannot slice")
    try:
        data = np.memmap(info.file, dtype=_NUMPY[info.dtype], mode="r", offset=info.start, shape=info.shape)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {info.file} ({e}); re-download it") from None
    if pieces:
        axis = axis % data.ndim
        parts = []
        for p in pieces:
            index = [slice(None)] * data.ndim
            index[axis] = slice(p.start, p.stop)
            part = np.asarray(data[tuple(index)])
            pad = [(0, 0)] * data.ndim
            pad[axis] = (0, p.size - (p.stop - p.start))
            parts.append(np.pad(part, pad))
        out = np.concatenate(parts, axis=axis)
    else:
        out = np.array(data)
    array = mx.array(out)
    return array.view(mx.bfloat16) if info.dtype == "BF16" else array


def read_sharded(model, infos: dict[str, TensorInfo], plan: ShardPlan) -> dict[str, mx.array]:
    """This rank's arrays for every tensor of `infos` (model parameter names), cut by `plan`.
    `model` must still be unsharded (its modules tell which arrays are quantized)."""
    modules = dict(model.named_modules())
    weights = {}
    for name, info in infos.items():
        path, array = name.rsplit(".", 1)
        cut = plan.cuts.get(path)
        if cut is None:
            weights[name] = read_tensor(info)
        else:
            weights[name] = read_tensor(info, *array_cut(modules[path], array, cut))
    return weights


def model_fingerprint(args, infos: dict[str, TensorInfo]) -> mx.array:
    """Four 32-bit words of a hash of the hyper-parameters and every tensor's name, dtype and
    shape: ranks that loaded different models (or conversions) disagree on it."""
    described = [repr(sorted(vars(args).items(), key=lambda kv: kv[0]))]
    described += [f"{n}:{i.dtype}:{i.shape}" for n, i in sorted(infos.items())]
    digest = hashlib.sha256(json.dumps(described).encode()).digest()[:16]
    return mx.array(np.frombuffer(digest, dtype=np.uint32))


def check_same_model(args, infos: dict[str, TensorInfo], group) -> None:
    """A UserError on every rank (so none waits forever) when the ranks' models differ."""
    prints = all_gather(model_fingerprint(args, infos), group)
    differ = [r for r in range(group.size()) if not mx.array_equal(prints[r], prints[0]).item()]
    if differ:
        raise UserError(
            f"rank {differ[0]} loaded a different model than rank 0 (config or tensors differ); "
            "give every machine the same model directory"
        )


def load_sharded(model, infos: dict[str, TensorInfo], group, lazy: bool = False):
    """Shard an unsharded, unloaded `model` across `group` and read this rank's weights."""
    check_same_model(model.args, infos, group)
    plan = make_plan(model, group.size(), group.rank())
    weights = read_sharded(model, infos, plan)
    apply_plan(model, plan, group)
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    return model
