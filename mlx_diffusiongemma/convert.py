"""Convert a Hugging Face DiffusionGemma checkpoint to an MLX model directory.

Every input header is validated against the model built from `config.json` before anything
is written. Tensors are then streamed in input-file order: each is read in chunks of rows at
its validated offsets, cast, quantized and written straight into an output shard whose
header was planned up front, so memory holds a few chunks, not a shard or the model.
Output goes to a temporary directory that is renamed into place once complete, with
`config.json` (carrying the mlx-lm / mlx-vlm `quantization` block) written last.
"""

import contextlib
import json
import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import UserError
from .generate import GenerationSettings
from .loading import (
    MODEL_PATTERNS, TOKENIZER_FILES, check_tokenizer_files, check_vocab, expected_shapes, load_config, load_tokenizer,
)
from .models import Model
from .ui.progress import ProgressBar
from .models.config import explain_shape
from .weights.atomic import atomic_output_dir
from .weights.checks import check_tensors
from .weights.hub import RELEASE_REPO, resolve_model_path
from .weights.safetensors import INDEX_NAME, TensorInfo, list_checkpoint

RECIPES = ("mixed", "8bit")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_SHARD_BYTES = 2 * 1024**3
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "chat_template.json",
    "processor_config.json", "preprocessor_config.json",
)
SAFETENSORS_DTYPE = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32"}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}
READ_DTYPES = {"BF16": (np.uint16, mx.bfloat16), "F16": (np.float16, None), "F32": (np.float32, None)}
CHUNK_BYTES = 64 * 1024**2

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the converted model as its output header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class TensorPlan:
    """How one input tensor becomes one (float) or three (quantized) output tensors."""

    name: str
    source: TensorInfo
    dtype: mx.Dtype
    quant: dict | None

    @property
    def outputs(self) -> list[OutputTensor]:
        dtype = SAFETENSORS_DTYPE[self.dtype]
        if self.quant is None:
            return [OutputTensor(self.name, dtype, self.source.shape)]
        *lead, I = self.source.shape
        bits, group = self.quant["bits"], self.quant["group_size"]
        base = self.name.removesuffix(".weight")
        return [
            OutputTensor(self.name, "U32", (*lead, I * bits // 32)),
            OutputTensor(f"{base}.scales", dtype, (*lead, I // group)),
            OutputTensor(f"{base}.biases", dtype, (*lead, I // group)),
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass(frozen=True)
class Source:
    """A validated input checkpoint: its directory, raw config, model skeleton and tensors
    (already in the model's naming)."""

    path: Path
    config: dict
    model: Model
    infos: dict[str, TensorInfo]


def read_source(hf_path, text_only: bool = False) -> Source:
    """Find a checkpoint (directory or Hub id) and validate its config and every header.

    The model is built from `config.json` without materializing weights (MLX arrays are
    lazy), so this costs seconds and no memory even for the full-size model.
    """
    path = resolve_model_path(hf_path, MODEL_PATTERNS)
    config, args = load_config(path)
    _refuse_quantized(path, config)
    model = Model(args, text_only=text_only)
    infos = model.sanitize(list_checkpoint(path))
    check_tensors(infos, expected_shapes(model), explain=explain_shape)
    return Source(path, config, model, infos)


def check_copied_tokenizer(source: Source) -> None:
    """Load the tokenizer files the output will get, as `load` will, so a corrupt one is
    refused before anything is written instead of copied."""
    from .chat import check_chat_template

    check_tokenizer_files(source.path)
    if any(not (source.path / name).is_file() for name in TOKENIZER_FILES):
        return  # a warning says so (see _files_to_copy)
    tokenizer = load_tokenizer(source.path, list(source.model.args.eos_token_ids))
    check_vocab(tokenizer, source.model)
    check_chat_template(tokenizer, required=False)


def _refuse_quantized(path: Path, config: dict) -> None:
    if config.get("quantization"):
        raise UserError(
            f"{path / 'config.json'} has a \"quantization\" block: this is already an MLX conversion; "
            "load it directly (no conversion needed) or convert the bf16 release"
        )
    hf_quant = config.get("quantization_config")
    method = hf_quant.get("quant_method") if isinstance(hf_quant, dict) else None
    if method:
        raise UserError(
            f"{path / 'config.json'}: checkpoints quantized with quant_method {method!r} are not supported; "
            f"convert the bf16 release ({RELEASE_REPO})"
        )


def check_settings(q_bits: int, q_group_size: int, recipe: str, dtype: str | None) -> None:
    """Reject quantization settings MLX cannot honour, naming the allowed values."""
    if recipe not in RECIPES:
        raise UserError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    # `type(...) is int`: "4", 4.0 and True compare or hash like the allowed integers.
    if type(q_bits) is not int or q_bits not in BITS:
        raise UserError(f"q_bits={q_bits!r} is not supported; choose one of {', '.join(map(str, BITS))}")
    if type(q_group_size) is not int or q_group_size not in GROUP_SIZES:
        raise UserError(
            f"q_group_size={q_group_size!r} is not supported; choose one of {', '.join(map(str, GROUP_SIZES))}"
        )
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


def default_dtype(config: dict) -> str:
    """The checkpoint's own float type from `config.json`, else bfloat16."""
    text = config.get("text_config") or {}
    for value in (config.get("dtype"), config.get("torch_dtype"), text.get("dtype"), text.get("torch_dtype")):
        if value in DTYPES:
            return value
    return "bfloat16"


def plan_conversion(
    model: Model,
    infos: dict[str, TensorInfo],
    *,
    quantize: bool = True,
    q_bits: int = 4,
    q_group_size: int = 64,
    recipe: str = "mixed",
    dtype: str = "bfloat16",
) -> list[TensorPlan]:
    """Decide, per tensor and in input-file order, its output dtype and quantization.

    Layers follow the model's `quant_predicate`: `True` means the recipe's bits, a dict its
    own settings (mixed recipe), `False` no quantization. A layer whose input dimension is
    not a multiple of its group size is an error, never silently left unquantized.
    """
    plans, misfit = _plans(model, infos, quantize, q_bits, q_group_size, recipe, dtype)
    if misfit is not None:
        path, width, group = misfit
        raise UserError(
            f"cannot quantize {path}: its input dimension {width} is not a multiple of the group size "
            f"{group}; {_group_size_hint(model, infos, q_bits, q_group_size, recipe)}"
        )
    return plans


def _plans(model, infos, quantize, q_bits, q_group_size, recipe, dtype="bfloat16"):
    """The plans, and the first layer (path, input dimension, group) its group size does not fit."""
    predicate = model.quant_predicate
    modules = dict(model.named_modules())
    default = recipe_default(q_bits, q_group_size, recipe)
    plans, misfit = [], None
    for name, info in sorted(infos.items(), key=lambda item: (str(item[1].file), item[1].start)):
        quant = None
        path = name.removesuffix(".weight")
        if quantize and name.endswith(".weight") and path in modules:
            quant = _layer_quant(predicate(path, modules[path]), default, recipe)
            if quant is not None and info.shape[-1] % quant["group_size"] and misfit is None:
                misfit = (path, info.shape[-1], quant["group_size"])
        plans.append(TensorPlan(name, info, DTYPES[dtype], quant))
    return plans, misfit


def _group_size_hint(model, infos, q_bits: int, q_group_size: int, recipe: str) -> str:
    """Settings that would quantize every layer, found by planning them: under the mixed
    recipe the non-expert layers keep group 64 whatever q_group_size says."""
    fits = lambda g, r: _plans(model, infos, True, q_bits, g, r)[1] is None  # noqa: E731
    same = [str(g) for g in GROUP_SIZES if g != q_group_size and fits(g, recipe)]
    options = [f"q_group_size {' or '.join(same)}"] if same else []
    if recipe != "8bit":
        eight = [str(g) for g in GROUP_SIZES if fits(g, "8bit")]
        options += [f"recipe 8bit with q_group_size {' or '.join(eight)}"] if eight else []
    if not options:
        return "no group size fits every layer: convert without quantization"
    return f"use {' or '.join(options)}, or convert without quantization"


def recipe_default(q_bits: int, q_group_size: int, recipe: str) -> dict:
    """The setting a recipe gives layers the model's predicate leaves to it."""
    return {"group_size": q_group_size, "bits": 8 if recipe == "8bit" else q_bits}


def _layer_quant(choice, default: dict, recipe: str) -> dict | None:
    if not choice:
        return None
    if recipe == "8bit" or choice is True:
        return dict(default)
    return {"group_size": choice["group_size"], "bits": choice["bits"]}


def quantization_block(plans: list[TensorPlan], default: dict) -> dict | None:
    """The `quantization` entry of config.json in the mlx-lm / mlx-vlm layout: the recipe's
    default at the top level and every quantized layer that differs from it by its path.
    Loaders quantize the remaining layers exactly when the checkpoint stores their scales."""
    quantized = [p for p in plans if p.quant is not None]
    if not quantized:
        return None
    block = {**default, "mode": "affine"}
    for p in quantized:
        if p.quant != default:
            block[p.name.removesuffix(".weight")] = dict(p.quant)
    return block


def shard_plans(plans: list[TensorPlan], max_shard_bytes: int) -> list[tuple[str, list[TensorPlan]]]:
    """Group plans into output shards of at most `max_shard_bytes` (a larger tensor gets
    its own shard), named as mlx-lm and mlx-vlm name them."""
    groups: list[list[TensorPlan]] = []
    size = 0
    for plan in plans:
        if not groups or size + plan.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(plan)
        size += plan.nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    return list(zip(names, groups))


def convert(
    hf_path,
    mlx_path,
    *,
    quantize: bool = True,
    q_bits: int = 4,
    q_group_size: int = 64,
    recipe: str = "mixed",
    dtype: str | None = None,
    text_only: bool = False,
    overwrite: bool = False,
    progress: Progress | str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Convert a DiffusionGemma checkpoint (directory or Hub id) into an MLX model directory.

    Args:
        quantize: quantize the weights; with the default `recipe="mixed"` the routed experts
            get `q_bits` and attention, dense MLP, router, self-conditioning and the tied
            embedding get 8 bits (group 64); `recipe="8bit"` puts all of them at 8 bits.
            Norms, scalars and the vision tower are never quantized.
        dtype: "bfloat16", "float16" or "float32" for unquantized tensors and quantization
            scales; default: the checkpoint's own dtype.
        text_only: leave the vision tower out of the output.
        overwrite: replace a non-empty `mlx_path` (otherwise refused).
        progress: `progress(done_bytes, total_bytes)` called after each tensor, or "rich"
            for a progress bar on stderr. Raising from it (Ctrl-C) aborts cleanly.

    Returns the output directory. On any failure no output directory is left behind.
    """
    check_settings(q_bits, q_group_size, recipe, dtype)
    source = read_source(hf_path, text_only)
    check_copied_tokenizer(source)
    # The output gets generation_config.json as is: a bad value is refused here, not copied.
    GenerationSettings.resolve(source.model)
    _check_output(Path(mlx_path), source.path)
    dtype = dtype or default_dtype(source.config)
    plans = plan_conversion(
        source.model, source.infos, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
        recipe=recipe, dtype=dtype,
    )
    config = _output_config(source, quantization_block(plans, recipe_default(q_bits, q_group_size, recipe)), dtype)
    copied = _files_to_copy(source.path)
    needed = sum(p.nbytes for p in plans) + sum(f.stat().st_size for f in copied) + 2**20
    # Ctrl-C (KeyboardInterrupt) propagates after atomic_output_dir removed the partial output.
    with _progress_hook(progress) as hook, atomic_output_dir(mlx_path, overwrite, needed_bytes=needed) as out:
        _copy_files(copied, out)
        weight_map = write_shards(out, shard_plans(plans, max_shard_bytes), hook)
        _write_index(out, weight_map, sum(p.nbytes for p in plans))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # last: marks completion
    return Path(mlx_path).expanduser().resolve()


def _check_output(out: Path, source: Path) -> None:
    # Replacing the output must never delete the checkpoint being read.
    out, source = out.expanduser().resolve(), source.resolve()
    if source.is_relative_to(out):
        raise UserError(f"output directory {out} contains the input checkpoint {source}; choose another output directory")


def _files_to_copy(path: Path) -> list[Path]:
    missing = [name for name in TOKENIZER_FILES if not (path / name).is_file()]
    if missing:
        warnings.warn(
            f"{path} has no {' or '.join(missing)}: the converted model loads but cannot generate text "
            "until you copy the tokenizer files into it",
            stacklevel=3,
        )
    return [path / name for name in COPIED_FILES if (path / name).is_file()]


def _copy_files(files: list[Path], out: Path) -> None:
    for file in files:
        shutil.copyfile(file, out / file.name)


@contextlib.contextmanager
def _progress_hook(progress: Progress | str | None) -> Iterator[Progress]:
    if progress is None:
        yield lambda done, total: None
    elif progress == "rich":
        with ProgressBar("Converting") as bar:
            yield bar
    elif callable(progress):
        yield progress
    else:
        raise UserError(f"progress must be a callable or 'rich', found {progress!r}")


def write_shards(out: Path, shards: list[tuple[str, list[TensorPlan]]], progress: Progress) -> dict[str, str]:
    """Stream every tensor from its input shard into the planned output shards."""
    total = sum(p.source.nbytes for _, group in shards for p in group)
    done, weight_map = 0, {}
    for name, group in shards:
        tensors = [t for p in group for t in p.outputs]
        with open(out / name, "wb") as f:
            _write_header(f, tensors)
            for plan in group:
                _write_tensor(f, plan)
                mx.clear_cache()
                done += plan.source.nbytes
                progress(done, total)
        weight_map.update({t.name: name for t in tensors})
    return weight_map


def _write_header(f, tensors: list[OutputTensor]) -> None:
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned
    f.write(len(raw).to_bytes(8, "little") + raw)


def _write_tensor(f, plan: TensorPlan) -> None:
    """Convert one tensor in row chunks. Quantizing works row by row, so packed weights
    are written as they come and their (small) scales and biases after them."""
    end = f.tell() + plan.nbytes
    extras = []
    for rows in read_rows(plan.source):
        rows = rows.astype(plan.dtype)
        if plan.quant is None:
            _write_array(f, rows)
        else:
            weight, scales, biases = mx.quantize(rows, **plan.quant)
            _write_array(f, weight)
            extras.append((scales, biases))
    for i in (0, 1):
        for pair in extras:
            _write_array(f, pair[i])
    if f.tell() != end:
        raise RuntimeError(f"{plan.name}: wrote {f.tell() - end + plan.nbytes} bytes, planned {plan.nbytes}")


def _write_array(f, a: mx.array) -> None:
    a = mx.contiguous(a)
    mx.eval(a)
    f.write(memoryview(a))


def read_rows(info: TensorInfo, chunk_bytes: int | None = None) -> Iterator[mx.array]:
    """A float tensor's data as (rows, last dim) arrays of about `chunk_bytes`, read at the
    header's validated offsets (numpy has no bfloat16: those are read as uint16 bits)."""
    np_dtype, view = READ_DTYPES[info.dtype]
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    width = info.shape[-1] if info.shape else 1
    itemsize = np.dtype(np_dtype).itemsize
    rows = math.prod(info.shape) // width if width else 0
    step = max(1, chunk_bytes // (width * itemsize)) if width else 1
    for start in range(0, rows, step):
        n = min(step, rows - start)
        try:
            data = np.fromfile(info.file, dtype=np_dtype, count=n * width, offset=info.start + start * width * itemsize)
        except OSError as e:
            raise UserError(f"cannot read tensor {info.name!r} from {info.file} ({e.strerror}); re-download it") from None
        if data.size != n * width:
            raise UserError(f"{info.file} was truncated while reading tensor {info.name!r}; re-download it")
        a = mx.array(data.reshape(n, width))
        yield a.view(view) if view is not None else a


def _write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _output_config(source: Source, block: dict | None, dtype: str) -> dict:
    config = dict(source.config)
    config["dtype"] = dtype
    if "vision_tower" not in source.model.model.encoder:
        config.pop("vision_config", None)
    if block:
        # mlx-lm and mlx-vlm write both keys; Hugging Face tooling reads the second.
        config["quantization"] = block
        config["quantization_config"] = block
    return config
