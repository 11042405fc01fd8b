"""Reading checkpoint files safely, independent of the model.

Safetensors headers are parsed here by hand (8-byte little-endian length, then JSON) so
that every defect of a downloaded file can be named in one `UserError`; nothing is ever
unpickled or executed. Callers map tensor names to the model's naming and supply the
expected shapes; this module only checks files, names, dtypes and shapes, finds model
directories (locally or on the Hugging Face Hub) and writes output directories atomically.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import importlib
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import UserError

INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32"})
MAX_HEADER_BYTES = 100 * 1024 * 1024
RELEASE_REPO = "google/diffusiongemma-26B-A4B-it"

_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_SNIFF_BYTES = 64
_DISK_FULL = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e)
_LOCK_NAME = ".partial.lock"
_HUB_ID = re.compile(r"(?!.*(?:--|\.\.))\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?", re.ASCII)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it; start/end are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------
# One safetensors file


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading tensor data."""
    path = Path(path)
    size = _regular_file_size(path)
    try:
        with path.open("rb") as f:
            prefix = f.read(_SNIFF_BYTES)
            _reject_foreign_file(path, prefix, size)
            length = int.from_bytes(prefix[:8], "little")
            _check_header_length(path, prefix, length, size)
            f.seek(8)
            raw = f.read(length)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check the file's permissions") from None
    header = _decode_header(path, raw)
    infos = {
        name: _tensor_info(path, name, entry, 8 + length)
        for name, entry in header.items()
        if name != "__metadata__"
    }
    _check_layout(path, infos, size)
    return infos


def _regular_file_size(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"safetensors file {path} does not exist; re-download the checkpoint") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} is not a regular file; expected a safetensors file, remove or replace it")
    if st.st_size == 0:
        raise UserError(f"safetensors file {path} is empty (0 bytes): the download did not finish; re-download it")
    return st.st_size


def _reject_foreign_file(path: Path, prefix: bytes, size: int) -> None:
    if prefix.startswith(_LFS_MAGIC):
        raise UserError(
            f"{path} is a Git LFS pointer ({size} bytes), not the weights: run `git lfs pull` in {path.parent}"
        )
    text = prefix.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")):
        raise UserError(
            f"{path} is an HTML page, not a safetensors file: the download saved a web page; re-download it"
        )
    if size < 8:
        raise UserError(
            f"{path} is {size} bytes, too short for a safetensors file (at least 8): re-download it"
        )


def _check_header_length(path: Path, prefix: bytes, length: int, size: int) -> None:
    if length == 0:
        raise UserError(f"{path} has a zero-length safetensors header: the file is corrupt; re-download it")
    if length > MAX_HEADER_BYTES:
        raise UserError(
            f"{path} declares a {length}-byte header (at most {MAX_HEADER_BYTES} allowed){_text_hint(prefix)}: "
            "it is not a valid safetensors file; re-download it"
        )
    if 8 + length > size:
        raise UserError(
            f"safetensors file {path} is truncated: expected at least {8 + length} bytes for its header, "
            f"found {size}; the download was interrupted, re-download it"
        )


def _text_hint(prefix: bytes) -> str:
    printable = 0
    while printable < min(len(prefix), 40) and 32 <= prefix[printable] < 127:
        printable += 1
    if printable < 8:
        return ""
    return f" and starts with the text {prefix[:printable].decode('ascii')!r}"


def _decode_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise UserError(
            f"{path} lists {e.key!r} twice in its safetensors header; the file is corrupt, re-convert or re-download it"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(
            f"{path} has a safetensors header that is not valid JSON ({_first_line(e)}); re-download it"
        ) from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a safetensors header that is not a JSON object; re-download it")
    if not isinstance(header.get("__metadata__") or {}, dict):  # mlx writes null
        raise UserError(f"{path} has a `__metadata__` entry that is not a JSON object; re-convert the file")
    return header


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise UserError(f"{where} has a header entry that is not a JSON object; re-download the file")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise UserError(f"{where} has no {' or '.join(missing)} in the header; re-download or re-convert the file")
    dtype = entry["dtype"]
    if dtype not in _DTYPE_BITS:
        raise UserError(
            f"{where} has unknown dtype {dtype!r}, expected a safetensors dtype such as 'BF16'; re-download the file"
        )
    shape = _int_list(where, "shape", entry["shape"])
    begin, end = _offsets(where, entry["data_offsets"])
    _check_byte_count(where, dtype, shape, end - begin)
    return TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)


def _int_list(where: str, field: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise UserError(
            f"{where} has {field} {value!r}, expected a list of non-negative integers; re-download the file"
        )
    return tuple(value)


def _offsets(where: str, value: object) -> tuple[int, int]:
    offsets = _int_list(where, "data_offsets", value)
    if len(offsets) != 2:
        raise UserError(f"{where} has data_offsets {list(offsets)}, expected [begin, end]; re-download the file")
    if offsets[0] > offsets[1]:
        raise UserError(
            f"{where} has data_offsets {list(offsets)} out of order (begin > end); the file is corrupt, re-download it"
        )
    return offsets[0], offsets[1]


def _check_byte_count(where: str, dtype: str, shape: tuple[int, ...], found: int) -> None:
    expected = -(-math.prod(shape) * _DTYPE_BITS[dtype] // 8)
    if found != expected:
        raise UserError(
            f"{where} is {dtype} {list(shape)}, which needs {expected} bytes, but its data_offsets span {found}; "
            "the file is corrupt, re-convert or re-download it"
        )


def _check_layout(path: Path, infos: Mapping[str, TensorInfo], size: int) -> None:
    end = max((info.end for info in infos.values()), default=0)
    if end > size:
        raise UserError(
            f"safetensors file {path} is truncated: expected {end} bytes, found {size}; "
            "the download was interrupted, re-download it"
        )
    ordered = sorted((i for i in infos.values() if i.nbytes), key=lambda i: (i.start, i.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.start < prev.end:
            raise UserError(
                f"{path}: tensors {prev.name!r} (bytes {prev.start}-{prev.end}) and {cur.name!r} "
                f"(bytes {cur.start}-{cur.end}) overlap; the file is corrupt, re-convert or re-download it"
            )


# ---------------------------------------------------------------------------------------
# A checkpoint directory


def list_checkpoint(model_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in `model_dir`, from its shard index or its *.safetensors files."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(
            f"model directory {model_dir} does not exist; pass the directory holding the .safetensors files"
        )
    index = model_dir / INDEX_NAME
    if index.exists():
        return _list_indexed(model_dir, index)
    return _list_unindexed(model_dir)


def _list_indexed(model_dir: Path, index: Path) -> dict[str, TensorInfo]:
    weight_map = _read_weight_map(index)
    paths = _shard_paths(model_dir, index, sorted(set(weight_map.values())))
    headers = {shard: read_header(path) for shard, path in paths.items()}
    infos = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise UserError(
                f"{index} puts tensor {name!r} in {shard}, but {paths[shard]} does not contain it: "
                "the shards and the index come from different downloads; re-download the model"
            )
        infos[name] = headers[shard][name]
    _check_claimed_elsewhere(weight_map, headers)
    return infos


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise UserError(f"{index} lists {e.key!r} twice; re-download the index") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{index} is not valid JSON ({_first_line(e)}); re-download it") from None
    except OSError as e:
        raise UserError(f"cannot read {index}: {e.strerror}; check the file's permissions") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index} has no non-empty \"weight_map\" object; re-download the index")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(
            f"{index}: weight_map entry {bad!r} is {weight_map[bad]!r}, expected a shard file name; "
            "re-download the index"
        )
    return weight_map


def _shard_paths(model_dir: Path, index: Path, shards: list[str]) -> dict[str, Path]:
    for shard in shards:
        if not _is_plain_relative(shard):
            raise UserError(
                f"{index} points to shard {shard!r} outside {model_dir}; expected a file name inside the "
                "model directory, re-download the index from a trusted source"
            )
    paths = {shard: model_dir / shard for shard in shards}
    missing = [shard for shard, path in paths.items() if not path.exists()]
    if missing:
        raise UserError(
            f"{_sample(missing)} ({len(missing)} of {len(shards)} shards listed in {INDEX_NAME}) missing from "
            f"{model_dir}: the download is incomplete; download the missing shards"
        )
    for path in paths.values():
        _check_inside(model_dir, path)
    return paths


def _is_plain_relative(name: str) -> bool:
    if not name or "\\" in name or "\0" in name:
        return False
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        return False
    return ".." not in posix.parts


def _check_inside(model_dir: Path, path: Path) -> None:
    """Refuse a shard whose real location (after symlinks) is outside the model directory.

    Hugging Face cache snapshots are symlinks into the repo's `blobs/` folder, so for a
    directory `models--owner--name/snapshots/<rev>` the whole repo folder counts as inside.
    """
    root = Path(os.path.realpath(model_dir))
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent)
    real = Path(os.path.realpath(path))  # unlike Path.resolve, never raises on a symlink loop
    if not any(real.is_relative_to(r) for r in roots):
        raise UserError(
            f"shard {path} is a link to {real}, outside the model directory {model_dir}; "
            "copy the file into the model directory"
        )


def _check_claimed_elsewhere(weight_map: Mapping[str, str], headers: Mapping[str, Mapping[str, TensorInfo]]) -> None:
    for shard, header in headers.items():
        for name in header:
            claimed = weight_map.get(name, shard)
            if claimed != shard:
                raise UserError(
                    f"tensor {name!r} is in both {shard} and {claimed} (the index says {claimed}): the shards come "
                    "from different downloads; re-download the model"
                )


def _list_unindexed(model_dir: Path) -> dict[str, TensorInfo]:
    # Names starting with "." are macOS AppleDouble files (._x.safetensors) and partial downloads.
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise UserError(
            f"no .safetensors files in {model_dir}: expected model*.safetensors or {INDEX_NAME}; "
            "check the path or finish the download"
        )
    infos: dict[str, TensorInfo] = {}
    for path in files:
        _check_inside(model_dir, path)
        for name, info in read_header(path).items():
            if name in infos:
                raise UserError(
                    f"tensor {name!r} is in both {infos[name].file.name} and {path.name} in {model_dir}; "
                    "remove the stray file or re-download the model"
                )
            infos[name] = info
    return infos


def checkpoint_bytes(infos: Mapping[str, TensorInfo]) -> int:
    """Total size of the tensors' data in bytes (what loading them needs in memory)."""
    return sum(info.nbytes for info in infos.values())


# ---------------------------------------------------------------------------------------
# Names, dtypes and shapes against what the model expects


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
            f"needs ({_sample(missing)}): it is incomplete or for another model; re-download it"
        )


def _check_unexpected(
    infos: Mapping[str, TensorInfo], expected: Mapping[str, object], ignore: Callable[[str], bool]
) -> None:
    extra = [name for name in infos if name not in expected and not ignore(name)]
    if extra:
        raise UserError(
            f"checkpoint in {_source(infos)} has {len(extra)} tensors the model does not use ({_sample(extra)}): "
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


def _sample(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ..." if len(names) > limit else shown


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


# ---------------------------------------------------------------------------------------
# Finding a model: a local directory or a Hugging Face Hub id


def resolve_model_path(
    path_or_id: str | os.PathLike,
    allow_patterns: list[str] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Return the local model directory for a path, or download (or find cached) an `owner/name` Hub repo.

    Anything that looks like a local path is never sent to the Hub, so a typo gives
    "does not exist" instead of a confusing repo-id error.
    """
    text = os.fsdecode(path_or_id)
    if not text.strip():
        raise UserError("no model given (empty path); pass a model directory or a Hub id such as " + RELEASE_REPO)
    local = Path(os.path.expanduser(text))
    if not isinstance(path_or_id, str) or _exists(local) or _looks_local(text):
        return _existing_dir(local, text)
    if len(text) <= 96 and _HUB_ID.fullmatch(text):
        return _from_hub(text, allow_patterns, cache_dir)
    raise UserError(
        f"{text!r} is neither an existing directory nor a Hugging Face repo id (owner/name); "
        f"pass a model directory or an id such as {RELEASE_REPO}"
    )


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _looks_local(text: str) -> bool:
    if text.startswith((".", "~", "/")) or "\\" in text or text.count("/") > 1 or os.path.isabs(text):
        return True
    return any(_exists(parent) for parent in Path(text).parents if parent != Path("."))


def _existing_dir(local: Path, shown: str) -> Path:
    try:
        is_dir, exists = local.is_dir(), local.exists()
    except (OSError, ValueError):
        is_dir = exists = False
    if is_dir:
        return local
    if exists:
        raise UserError(
            f"{shown} is a file, not a model directory; pass the directory that contains it ({local.parent})"
        )
    raise UserError(f"model directory {shown} does not exist; check the path (a Hub id looks like owner/name)")


def _from_hub(repo_id: str, allow_patterns: list[str] | None, cache_dir: str | os.PathLike | None) -> Path:
    import huggingface_hub
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=allow_patterns, cache_dir=cache_dir, local_files_only=offline
        )
    except Exception as exc:
        mapped = _hub_error(repo_id, exc, offline)
        if mapped is None:
            raise
        raise mapped from exc
    return Path(folder)


def _hub_error(repo_id: str, exc: Exception, offline: bool) -> UserError | None:
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.IncompleteSnapshotError):
        return UserError(
            f"the cached copy of {repo_id} is incomplete and the Hub cannot be reached; "
            f"reconnect and run `hf download {repo_id}`"
        )
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return _not_cached_error(repo_id, offline)
    if isinstance(exc, hf.HfHubHTTPError):
        return _hub_http_error(repo_id, exc)
    if isinstance(exc, hf.HFValidationError):
        return UserError(f"{repo_id!r} is not a valid Hugging Face repo id ({_first_line(exc)}); check the spelling")
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return UserError(
            f"ran out of disk space downloading {repo_id} into the Hugging Face cache; "
            "free space or set HF_HOME to a larger disk"
        )
    if isinstance(exc, (OSError, *_http_error_types())):
        return UserError(
            f"downloading {repo_id} failed ({type(exc).__name__}: {_first_line(exc)}); "
            "check your network connection, or pass a local directory"
        )
    return None


def _not_cached_error(repo_id: str, offline: bool) -> UserError:
    if offline:
        return UserError(
            f"{repo_id} is not in the local Hugging Face cache and offline mode is on: "
            f"download it first (`hf download {repo_id}`) or pass a local directory"
        )
    return UserError(
        f"could not reach the Hugging Face Hub to download {repo_id}, and it is not in the local cache; "
        "check your network connection or pass a local directory"
    )


def _hub_http_error(repo_id: str, exc: Exception) -> UserError:
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.GatedRepoError):
        return UserError(
            f"{repo_id} is a gated repository: accept its license at https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login`"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return UserError(
            f"{repo_id} was not found on the Hugging Face Hub (or it is private); check the id, "
            "or log in with `hf auth login`"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return UserError(
            f"the Hugging Face Hub refused access to {repo_id} (HTTP {status}); log in with `hf auth login`"
        )
    return UserError(
        f"downloading {repo_id} from the Hugging Face Hub failed ({_first_line(exc)}); "
        "retry later or pass a local directory"
    )


def _http_error_types() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client this huggingface_hub version uses."""
    types = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            types.append(importlib.import_module(module).HTTPError)
    return tuple(types)


# ---------------------------------------------------------------------------------------
# Writing an output directory safely


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the filesystem that holds (or would hold) `path`."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(out_dir: str | os.PathLike, needed_bytes: int) -> None:
    """Raise a UserError if the filesystem of `out_dir` has less than `needed_bytes` free."""
    free = free_bytes(out_dir)
    if free < needed_bytes:
        raise UserError(
            f"not enough disk space for {out_dir}: need {_gb(needed_bytes)} GB, {_gb(free)} GB free; "
            "free up space or choose another output directory"
        )


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike, overwrite: bool = False, *, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `out_dir` and move it into place on success.

    An existing non-empty `out_dir` is refused unless `overwrite`. On any exception
    (Ctrl-C included) the temporary directory is deleted and the exception re-raised, with
    disk-full and file-size-limit errors turned into a UserError. With `needed_bytes`, free
    space is checked first. Partial directories left by killed earlier runs are removed.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    _refuse_existing(out_dir, overwrite)
    _make_parent(out_dir)
    if needed_bytes:
        check_free_space(out_dir.parent, needed_bytes)
    _remove_abandoned_partials(out_dir)
    tmp, lock = _make_partial(out_dir)
    try:
        try:
            yield tmp
        finally:
            _unlock(tmp, lock)
        _refuse_existing(out_dir, overwrite)
        _move_into_place(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        mapped = _disk_full_error(exc, out_dir, needed_bytes)
        if mapped is None:
            raise
        raise mapped from exc


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory; remove it or choose another path")
    empty = not any(out_dir.iterdir())
    if not empty and not overwrite:
        raise UserError(f"output directory {out_dir} is not empty; pass --overwrite or choose another path")
    # Replacing the current or home directory (or one holding them) would pull it from under the user.
    for precious in (Path(os.path.expanduser("~")).resolve(), Path.cwd().resolve()):
        if precious.is_relative_to(out_dir):
            raise UserError(
                f"refusing to replace {out_dir}: it contains {precious}; choose a dedicated output directory"
            )


def _make_parent(out_dir: Path) -> None:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir.parent}: {e.strerror}; choose another output directory") from None


def _make_partial(out_dir: Path) -> tuple[Path, int]:
    """Create `.NAME.partial-<random>` beside out_dir, holding a lock that marks it in use."""
    while True:
        tmp = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(
                f"cannot write in {out_dir.parent}: {e.strerror}; choose another output directory"
            ) from None
    # Locked before it gets its visible name, so no other run ever sees an unlocked live
    # directory; where the filesystem has no flock nobody can take the lock, which is safe.
    fd = os.open(tmp / f"{_LOCK_NAME}.new", os.O_CREAT | os.O_RDWR, 0o600)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp / f"{_LOCK_NAME}.new", tmp / _LOCK_NAME)
    return tmp, fd


def _unlock(tmp: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp / _LOCK_NAME)
    with contextlib.suppress(OSError):
        os.close(fd)


def _remove_abandoned_partials(out_dir: Path) -> None:
    """Delete partial siblings whose writer died (their lock can be taken); leave live ones alone."""
    for candidate in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.partial-*"):
        lock_path = candidate / _LOCK_NAME
        if candidate.is_symlink() or not candidate.is_dir() or lock_path.is_symlink():
            continue
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except OSError:
            continue
        try:
            if _owner_is_gone(fd, lock_path):
                shutil.rmtree(candidate, ignore_errors=True)
        finally:
            os.close(fd)


def _owner_is_gone(fd: int, lock_path: Path) -> bool:
    # A finishing run unlinks its lock file before releasing the lock, so a lock we can
    # take whose file is still linked was left by a run that died.
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return os.stat(lock_path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not os.path.lexists(out_dir) or not any(out_dir.iterdir()):
        os.replace(tmp, out_dir)  # POSIX rename replaces an empty directory atomically
        return
    aside = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
    os.rename(out_dir, aside)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(aside, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _disk_full_error(exc: BaseException, out_dir: Path, needed_bytes: int | None) -> UserError | None:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        reason = os.strerror(exc.errno)
    elif isinstance(exc, RuntimeError) and str(exc).startswith("[write]"):
        reason = _first_line(exc)  # mlx reports failed writes without an errno
    else:
        return None
    free = free_bytes(out_dir.parent)
    amount = f"{_gb(needed_bytes - free)} GB" if needed_bytes and needed_bytes > free else "space"
    return UserError(f"ran out of disk space writing {out_dir} ({reason}); free {amount} or choose another output")


# ---------------------------------------------------------------------------------------
# Memory


def physical_memory_bytes() -> int | None:
    """Installed RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory_warning(total_bytes: int, *, physical_bytes: int | None = None) -> str | None:
    """A one-line warning when weights of `total_bytes` need more than ~90% of RAM, else None."""
    ram = physical_bytes or physical_memory_bytes()
    if not ram or total_bytes <= 0.9 * ram:
        return None
    return (
        f"the model's weights need {_gb(total_bytes)} GB but this machine has {_gb(ram)} GB of memory; "
        "expect heavy swapping or a crash, use a 4-bit quantized conversion instead"
    )
