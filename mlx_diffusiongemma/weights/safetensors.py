"""Safetensors files and checkpoint directories, read without trusting them.

Headers are parsed by hand (8-byte little-endian length, then JSON) so that every defect of
a downloaded file can be named in one `UserError`; nothing is ever unpickled or executed.
A directory is either indexed (`model.safetensors.index.json`) or a set of shards.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import UserError, first_line

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_SNIFF_BYTES = 64


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
            f"{path} has a safetensors header that is not valid JSON ({first_line(e)}); re-download it"
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
        raise UserError(f"{index} is not valid JSON ({first_line(e)}); re-download it") from None
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
            f"{sample_names(missing)} ({len(missing)} of {len(shards)} shards listed in {INDEX_NAME}) missing from "
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


def sample_names(names: list[str], limit: int = 3) -> str:
    """The first few names, for messages about many tensors."""
    shown = ", ".join(names[:limit])
    return f"{shown}, ..." if len(names) > limit else shown
