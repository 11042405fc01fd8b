"""Tests for mlx_diffusiongemma.weights: every bad file becomes one clear UserError."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
import safetensors.numpy
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from safetensors import safe_open

from mlx_diffusiongemma.weights.atomic import atomic_output_dir, check_free_space, free_bytes
from mlx_diffusiongemma.weights.checks import check_tensors
from mlx_diffusiongemma.weights.hub import resolve_model_path
from mlx_diffusiongemma.weights.memory import estimate_memory_warning
from mlx_diffusiongemma.weights.safetensors import INDEX_NAME, TensorInfo, checkpoint_bytes, list_checkpoint, read_header
from mlx_diffusiongemma.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASE = Path(__file__).parent / "data" / "diffusiongemma-26B-A4B-it"
BITS = {"BF16": 16, "F16": 16, "F32": 32, "I32": 32, "U32": 32, "F8_E4M3": 8, "F8_E5M2": 8, "F64": 64, "BOOL": 8}


# ---------------------------------------------------------------------------------------
# Helpers that write safetensors files by hand


def layout(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[dict, int]:
    """A header placing `tensors` (name -> (dtype, shape)) back to back, and its data size."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = int(np.prod(shape, dtype=np.int64)) * BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def write_raw(path: Path, header: dict | str | bytes, data_len: int = 0, *, length: int | None = None) -> Path:
    """Write length + header + data; the data region is a sparse hole, so huge files cost nothing."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    with open(path, "wb") as f:
        f.write((len(raw) if length is None else length).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + data_len)
    return path


def write_shard(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    header, data_len = layout(tensors)
    return write_raw(path, header, data_len)


def write_index(model_dir: Path, weight_map: dict[str, str]) -> Path:
    path = model_dir / INDEX_NAME
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def two_shard_checkpoint(model_dir: Path) -> None:
    first = {"a.weight": ("BF16", (4, 8)), "b.weight": ("BF16", (8,))}
    write_shard(model_dir / "model-00001-of-00002.safetensors", first)
    write_shard(model_dir / "model-00002-of-00002.safetensors", {"c.weight": ("F32", (2, 3))})
    write_index(model_dir, {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00001-of-00002.safetensors",
        "c.weight": "model-00002-of-00002.safetensors",
    })


GOOD = {"w": ("BF16", (4, 4)), "v": ("F32", (3,))}


# ---------------------------------------------------------------------------------------
# read_header: good files


def test_header_matches_safetensors_for_files_written_by_numpy_and_mlx(tmp_path):
    safetensors.numpy.save_file(
        {"a": np.zeros((3, 4), np.float32), "b": np.ones(5, np.int32)}, tmp_path / "np.safetensors",
        metadata={"format": "np"},
    )
    mx.save_safetensors(str(tmp_path / "mx.safetensors"), {"c": mx.zeros((2, 3), dtype=mx.bfloat16)})
    for path in (tmp_path / "np.safetensors", tmp_path / "mx.safetensors"):
        infos = read_header(path)
        with safe_open(path, framework="numpy") as f:
            assert set(infos) == set(f.keys())
            for name in f.keys():
                piece = f.get_slice(name)
                assert (infos[name].dtype, infos[name].shape) == (piece.get_dtype(), tuple(piece.get_shape()))
                assert infos[name].file == path


def test_header_byte_ranges_are_absolute_file_offsets(tmp_path):
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({"z": np.zeros(2, np.float32), "x": data}, path)
    info = read_header(path)["x"]
    raw = path.read_bytes()[info.start:info.end]
    assert info.nbytes == 24
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(info.shape), data)


def test_header_accepts_metadata_and_zero_sized_tensors(tmp_path):
    header, size = layout({"w": ("BF16", (2, 2)), "empty": ("F32", (0, 5))})
    header["__metadata__"] = {"format": "pt"}
    infos = read_header(write_raw(tmp_path / "m.safetensors", header, size))
    assert set(infos) == {"w", "empty"} and infos["empty"].nbytes == 0


# ---------------------------------------------------------------------------------------
# read_header: the catalogue of bad files


def test_truncated_shard_says_expected_and_found_bytes(tmp_path):
    path = write_shard(tmp_path / "model-00003-of-00011.safetensors", {"w": ("BF16", (64, 64))})
    full = path.stat().st_size
    os.truncate(path, full - 100)
    message = error_of(read_header, path)
    assert "model-00003-of-00011.safetensors" in message and "truncated" in message
    assert f"expected {full} bytes, found {full - 100}" in message and "re-download" in message


def test_file_cut_inside_its_header_is_truncated(tmp_path):
    path = write_shard(tmp_path / "cut.safetensors", GOOD)
    os.truncate(path, 20)
    message = error_of(read_header, path)
    assert "cut.safetensors" in message and "truncated" in message


def test_empty_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.touch()
    message = error_of(read_header, path)
    assert "model.safetensors" in message and "empty" in message and "re-download" in message


def test_file_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    message = error_of(read_header, path)
    assert "tiny.safetensors" in message and "too short" in message


@pytest.mark.parametrize("page", [
    "<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>",
    "\n  <html lang='en'><body>Access denied</body></html>",
])
def test_html_page_saved_as_shard(tmp_path, page):
    path = tmp_path / "model-00001-of-00002.safetensors"
    path.write_text(page)
    message = error_of(read_header, path)
    assert "model-00001-of-00002.safetensors" in message and "HTML" in message and "re-download" in message


def test_git_lfs_pointer_saved_as_shard(tmp_path):
    path = tmp_path / "model-00001-of-00011.safetensors"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 4956000000\n"
    )
    message = error_of(read_header, path)
    assert "model-00001-of-00011.safetensors" in message and "Git LFS pointer" in message
    assert f"run `git lfs pull` in {tmp_path}" in message


def test_zero_header_length(tmp_path):
    path = write_raw(tmp_path / "zero.safetensors", b"", 64)
    message = error_of(read_header, path)
    assert "zero.safetensors" in message and "zero-length" in message


def test_absurd_header_length(tmp_path):
    path = write_raw(tmp_path / "absurd.safetensors", b"{}", 16, length=1 << 40)
    message = error_of(read_header, path)
    assert "absurd.safetensors" in message and str(1 << 40) in message and "not a valid safetensors" in message


def test_json_error_body_saved_as_shard_mentions_its_text(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text('{"error":"Invalid credentials in Authorization header"}')
    message = error_of(read_header, path)
    assert "model.safetensors" in message and "starts with the text '{\"error\":\"Invalid credentials" in message


@pytest.mark.parametrize("raw", [b"not json at all", b'{"w": {"dtype": "BF16",', b"\xff\xfe{}"])
def test_non_json_header(tmp_path, raw):
    path = write_raw(tmp_path / "garbage.safetensors", raw, 8)
    message = error_of(read_header, path)
    assert "garbage.safetensors" in message and "not valid JSON" in message


def test_header_that_is_not_an_object(tmp_path):
    message = error_of(read_header, write_raw(tmp_path / "list.safetensors", "[1, 2]"))
    assert "list.safetensors" in message and "not a JSON object" in message


def test_overlapping_offsets(tmp_path):
    header = {
        "first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "second": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    message = error_of(read_header, write_raw(tmp_path / "lap.safetensors", header, 24))
    assert "lap.safetensors" in message and "'first'" in message and "'second'" in message and "overlap" in message


def test_duplicate_tensor_names(tmp_path):
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [%d, %d]}'
    raw = '{"w": ' + entry % (0, 8) + ', "w": ' + entry % (8, 16) + "}"
    message = error_of(read_header, write_raw(tmp_path / "dup.safetensors", raw, 16))
    assert "dup.safetensors" in message and "'w' twice" in message


def test_offsets_beyond_end_of_file(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    path = write_raw(tmp_path / "short.safetensors", header, 100)
    message = error_of(read_header, path)
    header_end = path.stat().st_size - 100
    assert "short.safetensors" in message and "truncated" in message
    assert f"expected {header_end + 4000} bytes, found {header_end + 100}" in message


@pytest.mark.parametrize("entry, hint", [
    ({"shape": [2], "data_offsets": [0, 8]}, "no dtype"),
    ({"dtype": "F32", "data_offsets": [0, 8]}, "no shape"),
    ({"dtype": "F32", "shape": [2]}, "no data_offsets"),
    ({"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype 'Q4_K'"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "out of order"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "expected [begin, end]"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "non-negative integers"),
    ({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}, "non-negative integers"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12 bytes"),
    ("F32", "not a JSON object"),
])
def test_malformed_entries_name_the_tensor(tmp_path, entry, hint):
    path = write_raw(tmp_path / "bad.safetensors", {"layer.w": entry}, 16)
    message = error_of(read_header, path)
    assert "bad.safetensors" in message and "'layer.w'" in message and hint in message


def test_missing_file_and_directory(tmp_path):
    assert "does not exist" in error_of(read_header, tmp_path / "gone.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    assert "not a regular file" in error_of(read_header, tmp_path / "dir.safetensors")


# ---------------------------------------------------------------------------------------
# list_checkpoint


def test_good_multi_shard_checkpoint(tmp_path):
    two_shard_checkpoint(tmp_path)
    infos = list_checkpoint(tmp_path)
    assert set(infos) == {"a.weight", "b.weight", "c.weight"}
    assert infos["c.weight"].file == tmp_path / "model-00002-of-00002.safetensors"
    assert infos["a.weight"].shape == (4, 8) and infos["c.weight"].dtype == "F32"
    assert checkpoint_bytes(infos) == 4 * 8 * 2 + 8 * 2 + 6 * 4
    check_tensors(infos, {"a.weight": (4, 8), "b.weight": (8,), "c.weight": (2, 3)})


def test_index_wins_over_stray_files_and_unlisted_header_entries(tmp_path):
    two_shard_checkpoint(tmp_path)
    write_shard(tmp_path / "consolidated.safetensors", {"a.weight": ("BF16", (4, 8))})
    infos = list_checkpoint(tmp_path)
    assert infos["a.weight"].file.name == "model-00001-of-00002.safetensors"


def test_shard_listed_in_index_but_missing(tmp_path):
    two_shard_checkpoint(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    message = error_of(list_checkpoint, tmp_path)
    assert "model-00002-of-00002.safetensors" in message and "1 of 2 shards" in message
    assert "download is incomplete" in message


@pytest.mark.parametrize("shard", [
    "../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors", "..\\x.safetensors", "C:/x.safetensors",
])
def test_index_pointing_outside_the_directory(tmp_path, shard):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_shard(tmp_path / "x.safetensors", GOOD)
    write_index(model_dir, {"w": shard})
    message = error_of(list_checkpoint, model_dir)
    assert repr(shard) in message and "outside" in message


def test_index_with_absolute_path_to_an_existing_file(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    outside = write_shard(tmp_path / "x.safetensors", GOOD)
    write_index(model_dir, {"w": str(outside)})
    assert "outside" in error_of(list_checkpoint, model_dir)


def test_symlinked_shard_pointing_outside_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    outside = write_shard(tmp_path / "elsewhere.safetensors", GOOD)
    (model_dir / "model.safetensors").symlink_to(outside)
    message = error_of(list_checkpoint, model_dir)
    assert "model.safetensors" in message and "outside the model directory" in message
    write_index(model_dir, {"w": "model.safetensors", "v": "model.safetensors"})
    assert "outside the model directory" in error_of(list_checkpoint, model_dir)


def test_symlinks_inside_and_hub_cache_blobs_are_accepted(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_shard(model_dir / "real.bin", GOOD)
    (model_dir / "model.safetensors").symlink_to("real.bin")
    assert set(list_checkpoint(model_dir)) == {"w", "v"}
    repo = tmp_path / "hub" / "models--owner--name"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    write_shard(repo / "blobs" / "0123abcd", GOOD)
    (snapshot / "model.safetensors").symlink_to("../../blobs/0123abcd")
    assert list_checkpoint(snapshot)["w"].shape == (4, 4)


def test_index_lists_a_tensor_its_shard_lacks(tmp_path):
    two_shard_checkpoint(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["d.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    message = error_of(list_checkpoint, tmp_path)
    assert "'d.weight'" in message and "model-00002-of-00002.safetensors" in message


def test_tensor_in_a_shard_the_index_assigns_elsewhere(tmp_path):
    two_shard_checkpoint(tmp_path)
    second = {"c.weight": ("F32", (2, 3)), "a.weight": ("BF16", (4, 8))}
    write_shard(tmp_path / "model-00002-of-00002.safetensors", second)
    message = error_of(list_checkpoint, tmp_path)
    assert "'a.weight'" in message and "both" in message


@pytest.mark.parametrize("text, hint", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {}}', "weight_map"),
    ('{"weight_map": {"w": 3}}', "'w'"),
    ('{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}', "'w' twice"),
])
def test_bad_index_files(tmp_path, text, hint):
    (tmp_path / INDEX_NAME).write_text(text)
    message = error_of(list_checkpoint, tmp_path)
    assert INDEX_NAME in message and hint in message


def test_unindexed_files_are_merged_and_hidden_files_skipped(tmp_path):
    write_shard(tmp_path / "one.safetensors", {"a": ("F32", (2,))})
    write_shard(tmp_path / "two.safetensors", {"b": ("F32", (3,))})
    (tmp_path / "._one.safetensors").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    assert set(list_checkpoint(tmp_path)) == {"a", "b"}


def test_same_tensor_in_two_unindexed_files(tmp_path):
    write_shard(tmp_path / "one.safetensors", {"a": ("F32", (2,))})
    write_shard(tmp_path / "two.safetensors", {"a": ("F32", (2,))})
    message = error_of(list_checkpoint, tmp_path)
    assert "'a'" in message and "one.safetensors" in message and "two.safetensors" in message


def test_symlink_loop_is_a_user_error(tmp_path):
    (tmp_path / "loop.safetensors").symlink_to("loop.safetensors")
    message = error_of(list_checkpoint, tmp_path)
    assert "loop.safetensors" in message


def test_directory_without_weights_or_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    message = error_of(list_checkpoint, tmp_path)
    assert str(tmp_path) in message and "no .safetensors files" in message
    assert "does not exist" in error_of(list_checkpoint, tmp_path / "nope")


def test_bad_shard_inside_a_checkpoint_names_the_shard(tmp_path):
    two_shard_checkpoint(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 1)
    message = error_of(list_checkpoint, tmp_path)
    assert "model-00002-of-00002.safetensors" in message and "truncated" in message


# ---------------------------------------------------------------------------------------
# check_tensors


def infos_of(tmp_path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, TensorInfo]:
    return read_header(write_shard(tmp_path / "model.safetensors", tensors))


def test_missing_tensors_are_named_and_counted(tmp_path):
    infos = infos_of(tmp_path, {"a": ("BF16", (2,))})
    expected = {"a": (2,), "b": (2,), "c": (2,), "d": (2,), "e": (2,)}
    message = error_of(check_tensors, infos, expected)
    assert "missing 4 of the 5 tensors" in message and "b, c, d, ..." in message and str(tmp_path) in message


def test_unexpected_tensor_unless_ignored(tmp_path):
    infos = infos_of(tmp_path, {"a": ("BF16", (2,)), "rotary.inv_freq": ("F32", (4,)), "junk": ("F32", (1,))})
    message = error_of(check_tensors, infos, {"a": (2,)}, ignore=lambda n: n.startswith("rotary."))
    assert "1 tensors the model does not use" in message and "junk" in message and "rotary" not in message
    check_tensors(infos, {"a": (2,)}, ignore=lambda n: n != "a")


def test_wrong_shape_includes_explanation(tmp_path):
    infos = infos_of(tmp_path, {"embed.weight": ("BF16", (100, 8)), "norm.weight": ("BF16", (8,))})
    message = error_of(
        check_tensors, infos, {"embed.weight": (128, 8), "norm.weight": (8,)},
        explain=lambda name: "config.json vocab_size=128, hidden_size=8",
    )
    assert "'embed.weight'" in message and "[100, 8]" in message and "[128, 8]" in message
    assert "vocab_size=128, hidden_size=8" in message and "model.safetensors" in message


@pytest.mark.parametrize("dtype, hint", [
    ("F8_E4M3", "fp8 checkpoints are not supported; use the bf16 release"),
    ("F8_E5M2", "fp8 checkpoints are not supported"),
    ("I32", "is I32, expected BF16/F16/F32"),
    ("F64", "is F64, expected BF16/F16/F32"),
    ("BOOL", "is BOOL"),
    ("U32", "packed quantized weights"),
])
def test_disallowed_dtypes(tmp_path, dtype, hint):
    infos = infos_of(tmp_path, {"layer.weight": (dtype, (4, 4))})
    message = error_of(check_tensors, infos, {"layer.weight": (4, 4)})
    assert "'layer.weight'" in message and "model.safetensors" in message and hint in message


def test_dtype_is_reported_before_unexpected_fp8_scale_tensors(tmp_path):
    infos = infos_of(tmp_path, {"w": ("F8_E4M3", (4, 4)), "w_scale_inv": ("F32", (1,))})
    assert "fp8" in error_of(check_tensors, infos, {"w": (4, 4)})


def test_quantized_mlx_layout(tmp_path):
    tensors = {
        "q.weight": ("U32", (8, 2)), "q.scales": ("BF16", (8, 1)), "q.biases": ("BF16", (8, 1)),
        "norm.weight": ("BF16", (16,)),
    }
    infos = infos_of(tmp_path, tensors)
    expected = {name: shape for name, (_, shape) in tensors.items()}
    check_tensors(infos, expected, quantized=lambda n: n == "q.weight")
    check_tensors(infos, expected, quantized=True)
    message = error_of(check_tensors, infos, expected, quantized=lambda n: n.endswith(".weight"))
    assert "'norm.weight'" in message and "expected U32" in message
    assert "packed quantized" in error_of(check_tensors, infos, expected)


def test_renamed_tensor_reports_its_stored_name(tmp_path):
    infos = infos_of(tmp_path, {"model.x.weight": ("I32", (2,))})
    message = error_of(check_tensors, {"x.weight": infos["model.x.weight"]}, {"x.weight": (2,)})
    assert "'x.weight' (stored as 'model.x.weight')" in message


# ---------------------------------------------------------------------------------------
# The released checkpoint's index, with sparse placeholder shards


def released_checkpoint(model_dir: Path, shapes: dict[str, list[int]]) -> None:
    index = json.loads((RELEASE / INDEX_NAME).read_text())
    shards: dict[str, dict] = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, {})[name] = ("BF16", tuple(shapes[name]))
    for shard, tensors in shards.items():
        write_shard(model_dir / shard, tensors)
    (model_dir / INDEX_NAME).write_bytes((RELEASE / INDEX_NAME).read_bytes())


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("release")
    released_checkpoint(model_dir, json.loads((RELEASE / "tensor_shapes.json").read_text()))
    return model_dir


def test_released_index_is_accepted(release_dir):
    shapes = json.loads((RELEASE / "tensor_shapes.json").read_text())
    index = json.loads((RELEASE / INDEX_NAME).read_text())
    infos = list_checkpoint(release_dir)
    assert len(infos) == 1047 and len({i.file for i in infos.values()}) == 11
    assert checkpoint_bytes(infos) == index["metadata"]["total_size"]
    check_tensors(infos, {name: tuple(shape) for name, shape in shapes.items()})
    used = sum(p.stat().st_blocks * 512 for p in release_dir.iterdir())
    assert used < 50_000_000, "placeholder shards must be sparse"


def test_released_index_reports_one_wrong_shape(release_dir):
    shapes = {name: tuple(shape) for name, shape in json.loads((RELEASE / "tensor_shapes.json").read_text()).items()}
    shapes["model.decoder.layers.5.self_attn.k_proj.weight"] = (2048, 2816)
    explain = lambda name: "num_global_key_value_heads"  # noqa: E731
    message = error_of(check_tensors, list_checkpoint(release_dir), shapes, explain=explain)
    assert "model.decoder.layers.5.self_attn.k_proj.weight" in message and "expected [2048, 2816]" in message
    assert "num_global_key_value_heads" in message and "model-000" in message


def test_memory_warning_for_the_released_size():
    total = json.loads((RELEASE / INDEX_NAME).read_text())["metadata"]["total_size"]
    warning = estimate_memory_warning(total, physical_bytes=32 * 10**9)
    assert warning and "51.6 GB" in warning and "32.0 GB" in warning and "\n" not in warning
    assert estimate_memory_warning(total, physical_bytes=128 * 10**9) is None
    assert estimate_memory_warning(1024) is None


# ---------------------------------------------------------------------------------------
# resolve_model_path


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub must not be contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_existing_directory(tmp_path, no_hub):
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("text", ["./nope", "/tmp/nope-dg-test/model", "~/nope-dg-test", "a/b/c", "models\\gemma"])
def test_mistyped_local_path_never_reaches_the_hub(tmp_path, monkeypatch, no_hub, text):
    monkeypatch.chdir(tmp_path)
    message = error_of(resolve_model_path, text)
    assert f"model directory {text} does not exist" in message


def test_owner_slash_name_with_an_existing_parent_is_local(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert "does not exist" in error_of(resolve_model_path, "models/gemma")


def test_file_instead_of_directory(tmp_path, no_hub):
    path = write_shard(tmp_path / "model.safetensors", GOOD)
    message = error_of(resolve_model_path, str(path))
    assert "is a file" in message and str(tmp_path) in message


def test_neither_path_nor_hub_id(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    for text in ("foo", "owner/na me", "owner/", "owner/name.", "a--b/c"):
        assert "neither an existing directory nor a Hugging Face repo id" in error_of(resolve_model_path, text)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_uncached_hub_id_offline(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_of(resolve_model_path, "owner/name")
    assert message == (
        "owner/name is not in the local Hugging Face cache and offline mode is on: "
        "download it first (`hf download owner/name`) or pass a local directory"
    )
    assert "offline mode is on" in error_of(resolve_model_path, "owner/name", cache_dir=tmp_path / "other")


def test_cached_hub_id_resolves_offline(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "models--owner--name"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    assert resolve_model_path("owner/name", ["*.json"]) == snapshot


def http_response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/owner/name"))


@pytest.mark.parametrize("error, hint", [
    (lambda: hf_errors.LocalEntryNotFoundError("Got: ConnectError"), "could not reach the Hugging Face Hub"),
    (lambda: hf_errors.RepositoryNotFoundError("404", response=http_response(404)), "not found on the Hugging Face"),
    (lambda: hf_errors.GatedRepoError("403", response=http_response(403)), "gated repository"),
    (lambda: hf_errors.HfHubHTTPError("401 Unauthorized", response=http_response(401)), "HTTP 401"),
    (lambda: hf_errors.HfHubHTTPError("500 Server Error\nmore", response=http_response(500)), "500 Server Error"),
    (lambda: hf_errors.HFValidationError("Repo id must use alphanumeric chars"), "not a valid Hugging Face repo id"),
    (lambda: hf_errors.IncompleteSnapshotError("3 files missing", snapshot_path="x"), "cached copy of owner/name is"),
    (lambda: ConnectionResetError("connection reset"), "check your network connection"),
    (lambda: OSError(errno.ENOSPC, "No space left on device"), "ran out of disk space"),
])
def test_hub_failures_become_one_line_user_errors(tmp_path, monkeypatch, error, hint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def fail(repo_id, **kwargs):
        assert repo_id == "owner/name" and kwargs["local_files_only"] is False
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    message = error_of(resolve_model_path, "owner/name")
    assert "owner/name" in message and hint in message


def test_programming_errors_from_the_hub_are_not_hidden(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def fail(repo_id, **kwargs):
        raise TypeError("bug")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(TypeError):
        resolve_model_path("owner/name")


def test_download_passes_patterns_and_returns_the_snapshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    seen = {}

    def download(repo_id, **kwargs):
        seen.update(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model_path("owner/name", ["*.json"]) == tmp_path
    assert seen["allow_patterns"] == ["*.json"]


# ---------------------------------------------------------------------------------------
# Output directories


def siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_atomic_output_dir_moves_into_place(tmp_path):
    out = tmp_path / "new" / "out"
    with atomic_output_dir(out, overwrite=False) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.partial-")
        (tmp / "model.safetensors").write_text("x")
        assert not out.exists()
    assert siblings(out.parent) == ["out"]
    assert siblings(out) == ["model.safetensors"]
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode, "permissions must follow the umask"


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt(), OSError(errno.EIO, "I/O error")])
def test_failure_leaves_nothing_behind(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        with atomic_output_dir(out, overwrite=False) as tmp:
            (tmp / "half.safetensors").write_bytes(b"\0" * 100)
            raise exc
    assert siblings(tmp_path) == []


def test_non_empty_output_is_refused_and_empty_one_is_reused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output_dir(out, overwrite=False) as tmp:
        (tmp / "a").write_text("new")
    (out / "b").write_text("keep")
    message = error_of(lambda: atomic_output_dir(out, overwrite=False).__enter__())
    assert message == f"output directory {out} is not empty; choose another path or allow overwriting it"
    assert siblings(tmp_path) == ["out"] and siblings(out) == ["a", "b"]


def test_overwrite_replaces_the_old_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.safetensors").write_text("new")
        assert (out / "old.safetensors").exists()
    assert siblings(tmp_path) == ["out"] and siblings(out) == ["new.safetensors"]


def test_failed_overwrite_keeps_the_old_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True):
            raise RuntimeError("conversion failed")
    assert siblings(tmp_path) == ["out"] and siblings(out) == ["old.safetensors"]


def test_output_path_that_is_a_file_or_holds_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in error_of(lambda: atomic_output_dir(tmp_path / "file", True).__enter__())
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    assert "refusing to replace" in error_of(lambda: atomic_output_dir(tmp_path, True).__enter__())
    (work / "notes.txt").unlink()
    assert "refusing to replace" in error_of(lambda: atomic_output_dir(".", False).__enter__())


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("[write] Unable to write 3145822 bytes to file."),
])
def test_disk_full_becomes_a_user_error_and_cleans_up(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        with atomic_output_dir(out, overwrite=False, needed_bytes=1) as tmp:
            (tmp / "half.safetensors").write_bytes(b"\0" * 100)
            raise exc
    assert str(info.value).startswith(f"ran out of disk space writing {out}")
    assert "choose another output" in str(info.value)
    assert siblings(tmp_path) == []


def test_needed_space_is_checked_before_writing(tmp_path):
    out = tmp_path / "out"
    message = error_of(lambda: atomic_output_dir(out, False, needed_bytes=10**18).__enter__())
    assert "not enough disk space" in message and "1000000000.0 GB" in message
    assert siblings(tmp_path) == []


def test_free_space_helpers(tmp_path):
    assert free_bytes(tmp_path / "not" / "yet") == free_bytes(tmp_path) > 0
    check_free_space(tmp_path, 1)
    message = error_of(check_free_space, tmp_path / "out", 10**18)
    assert str(tmp_path / "out") in message and "need 1000000000.0 GB" in message


FILE_SIZE_LIMIT_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import mlx.core as mx
    from mlx_diffusiongemma.weights.atomic import atomic_output_dir
    from mlx_diffusiongemma.errors import UserError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        with atomic_output_dir(Path(sys.argv[1]), overwrite=False) as tmp:
            if sys.argv[2] == "python":
                (tmp / "big.bin").write_bytes(b"\\0" * (4 << 20))
            else:
                mx.save_safetensors(str(tmp / "big.safetensors"), {"w": mx.zeros((1 << 20,))})
    except UserError as e:
        print(e)
        sys.exit(3)
""")


@pytest.mark.parametrize("writer", ["python", "mlx"])
def test_real_file_size_limit_cleans_up(tmp_path, writer):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(out), writer],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith(f"ran out of disk space writing {out}")
    assert siblings(tmp_path) == []


KILLED_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mlx_diffusiongemma.weights.atomic import atomic_output_dir

    with atomic_output_dir(Path(sys.argv[1]), overwrite=False) as tmp:
        (tmp / "half.safetensors").write_bytes(b"\\0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_partial_directory_of_a_killed_run_is_removed_but_live_ones_are_kept(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", KILLED_SCRIPT, str(out)], cwd=REPO_ROOT, env=env)
    (abandoned,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    live, unlocked = tmp_path / ".out.partial-live", tmp_path / ".out.partial-nolock"
    live.mkdir()
    unlocked.mkdir()
    fd = os.open(live / ".partial.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with atomic_output_dir(out, overwrite=False) as tmp:
            (tmp / "done").write_text("ok")
    finally:
        os.close(fd)
    assert not abandoned.exists() and live.exists() and unlocked.exists()
    assert siblings(out) == ["done"]


def test_empty_model_path(no_hub):
    assert "no model given" in error_of(resolve_model_path, "  ")
