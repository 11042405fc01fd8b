"""A checkpoint's names, dtypes and shapes against what the model expects.

Callers map tensor names to the model's naming and supply the expected shapes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from ..errors import UserError
from .hub import RELEASE_REPO
from .safetensors import TensorInfo, sample_names

FLOAT_DTYPES = frozenset({"BF16", "F16", "F32"})

def _never(name: str) -> bool:
    return False


def check_tensors(
    infos: Mapping[str, TensorInfo],
    expected: Mapping[str, tuple[int, ...]],
    *,
    allowed_dtypes: frozenset[str] = FLOAT_DTYPES,
    ignore: Callable[[str], bool] = _never,
    explain: Callable[[str], str] | None = None,
    quantized: bool | Callable[[str], bool] = False,
) -> None:
    """Check a checkpoint (already in the model's naming) against the model's expected shapes.

    `ignore` names tensors to drop silently; `explain(name)` names the config.json fields that
    set a tensor's shape. `quantized` marks packed MLX weights (which must be U32): a predicate
    on tensor names, or True to treat every `X.weight` that has an `X.scales` as packed.
    """
    is_packed = _packed_predicate(infos, quantized)
    _check_dtypes(infos, expected, allowed_dtypes, is_packed)
    _check_missing(infos, expected)
    _check_unexpected(infos, expected, ignore)
    _check_shapes(infos, expected, explain)


def _packed_predicate(
    infos: Mapping[str, TensorInfo], quantized: bool | Callable[[str], bool]
) -> Callable[[str], bool]:
    if callable(quantized):
        return quantized
    if not quantized:
        return _never
    return lambda name: name.endswith(".weight") and f"{name[: -len('.weight')]}.scales" in infos


def _check_dtypes(
    infos: Mapping[str, TensorInfo],
    expected: Mapping[str, object],
    allowed: frozenset[str],
    is_packed: Callable[[str], bool],
) -> None:
    for name, info in infos.items():
        if name not in expected:
            continue
        if is_packed(name):
            if info.dtype != "U32":
                raise UserError(
                    f"tensor {_where(name, info)} is {info.dtype}, expected U32 (packed quantized weights): "
                    "config.json's \"quantization\" does not match the weights; re-convert the model"
                )
        elif info.dtype not in allowed:
            raise UserError(_dtype_message(name, info, allowed))


def _dtype_message(name: str, info: TensorInfo, allowed: frozenset[str]) -> str:
    where = f"tensor {_where(name, info)}"
    if info.dtype.startswith("F8_"):
        return f"{where} is {info.dtype}: fp8 checkpoints are not supported; use the bf16 release ({RELEASE_REPO})"
    if info.dtype == "U32":
        return (
            f"{where} is U32 (packed quantized weights) but config.json has no \"quantization\" for it; "
            "use the config.json that came with these weights"
        )
    wanted = "/".join(sorted(allowed))
    return f"{where} is {info.dtype}, expected {wanted}; use the bf16 release ({RELEASE_REPO}) or convert to bf16"


def _check_missing(infos: Mapping[str, TensorInfo], expected: Mapping[str, object]) -> None:
    missing = [name for name in expected if name not in infos]
    if missing:
        raise UserError(
            f"checkpoint in {_source(infos)} is missing {len(missing)} of the {len(expected)} tensors the model "
            f"needs ({sample_names(missing)}): it is incomplete or for another model; re-download it"
        )


def _check_unexpected(
    infos: Mapping[str, TensorInfo], expected: Mapping[str, object], ignore: Callable[[str], bool]
) -> None:
    extra = [name for name in infos if name not in expected and not ignore(name)]
    if extra:
        raise UserError(
            f"checkpoint in {_source(infos)} has {len(extra)} tensors the model does not use ({sample_names(extra)}): "
            "it may be for another model; check the path and its config.json"
        )


def _check_shapes(
    infos: Mapping[str, TensorInfo],
    expected: Mapping[str, tuple[int, ...]],
    explain: Callable[[str], str] | None,
) -> None:
    wrong = [name for name in expected if tuple(infos[name].shape) != tuple(expected[name])]
    if not wrong:
        return
    name, info = wrong[0], infos[wrong[0]]
    why = f" (set by {explain(name)})" if explain else ""
    more = f" and {len(wrong) - 1} more mismatches" if len(wrong) > 1 else ""
    raise UserError(
        f"tensor {_where(name, info)} has shape {list(info.shape)}, expected {list(expected[name])}{why}{more}; "
        "check that config.json belongs to these weights"
    )


def _where(name: str, info: TensorInfo) -> str:
    stored = "" if info.name == name else f" (stored as {info.name!r})"
    return f"{name!r}{stored} in {info.file}"


def _source(infos: Mapping[str, TensorInfo]) -> str:
    parents = {str(info.file.parent) for info in infos.values()}
    if not parents:
        return "(no tensors)"
    return os.path.commonpath(sorted(parents))


