"""load_model / load: the accepted layouts, what text-only loading reads, dtype and
quantization checks, Hub ids and the memory warning."""

import copy
import json
import shutil
import warnings
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

import mlx_diffusiongemma.weights.memory as memory
from mlx_diffusiongemma import UserError, load, load_model
from mlx_diffusiongemma.weights.safetensors import INDEX_NAME
from mlx_diffusiongemma.convert import convert
from mlx_diffusiongemma.loading import MemoryWarning
from reference import make_reference

VOCAB = 160


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    return path, make_reference(path, seed=3)


def write_tokenizer(path: Path, size: int) -> None:
    """A word-level tokenizer with `size` tokens (ids 0-3 are pad, eos, bos, unk)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def copy_of(reference, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(reference[0], dst)
    return dst


def all_tensors(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def reshard(path: Path, shard_of) -> None:
    """Rewrite a checkpoint with each tensor in the shard `shard_of(name)` names."""
    tensors = all_tensors(path)
    for old in path.glob("*.safetensors"):
        old.unlink()
    shards: dict[str, dict] = {}
    for name, value in tensors.items():
        shards.setdefault(shard_of(name), {})[name] = value
    for shard, values in shards.items():
        safetensors.numpy.save_file(values, str(path / shard))
    weight_map = {name: shard_of(name) for name in tensors}
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_text_only_never_opens_the_vision_shard(reference, tmp_path, monkeypatch):
    path = copy_of(reference, tmp_path)
    reshard(path, lambda name: "vision.safetensors" if "vision" in name else "text.safetensors")
    opened = []
    real_load = mx.load
    monkeypatch.setattr(mx, "load", lambda file, *a, **k: opened.append(Path(file).name) or real_load(file, *a, **k))
    model = load_model(path, text_only=True)
    assert opened == ["text.safetensors"] and "vision_tower" not in model.model.encoder
    opened.clear()
    load_model(path)
    assert sorted(opened) == ["text.safetensors", "vision.safetensors"]


def test_hf_directory_in_bfloat16(reference, tmp_path):
    _, ref = reference
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    model = load_model(tmp_path / "bf16", text_only=True)
    assert model.model.decoder.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16


def test_converted_4bit_model_loads_lazily(tmp_path):
    make_reference(tmp_path / "hf", seed=4, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
                   head_dim=64, global_head_dim=64, vocab_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(tmp_path / "hf", tmp_path / "q4")
    model = load_model(out, text_only=True, lazy=True)
    experts = model.layers[0].experts.gate_up_proj
    assert experts.bits == 4 and experts.weight.dtype == mx.uint32


def test_memory_warning(reference, monkeypatch):
    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: 1_000_000)
    with pytest.warns(MemoryWarning, match="GB of memory"):
        load_model(reference[0], text_only=True, lazy=True)


def test_hub_id_is_downloaded_with_patterns(reference, monkeypatch):
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(reference[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    load_model("someone/diffusiongemma-tiny", text_only=True, lazy=True)
    (repo, patterns), = calls
    assert repo == "someone/diffusiongemma-tiny" and "*.safetensors" in patterns and "*.json" in patterns
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl")) for p in patterns)


def test_load_returns_the_tokenizer_with_generation_eos(reference, tmp_path):
    path = copy_of(reference, tmp_path)
    write_tokenizer(path, VOCAB)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106 % VOCAB]}))
    model, tokenizer = load(path)
    assert tokenizer.encode("w5 w6") == [5, 6] and set(tokenizer.eos_token_ids) == {1, 106}
    assert "vision_tower" not in model.model.encoder


def test_tokenizer_problems(reference, tmp_path):
    path = copy_of(reference, tmp_path)
    with pytest.raises(UserError, match="no tokenizer.json"):
        load(path)
    write_tokenizer(path, VOCAB + 40)
    with pytest.raises(UserError, match=f"tokenizer has {VOCAB + 40} tokens but the model's vocab_size is {VOCAB}"):
        load(path)


def retype(path: Path, name: str, dtype: str, itemsize: int) -> None:
    """Rewrite the shard holding `name` with that tensor stored as `dtype` (zeros)."""
    shard = path / json.loads((path / INDEX_NAME).read_text())["weight_map"][name]
    with safe_open(shard, "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header, data = {}, b""
    for key, value in tensors.items():
        raw = value.tobytes() if key != name else b"\0" * (value.size * itemsize)
        header[key] = {"dtype": dtype if key == name else "F32", "shape": list(value.shape),
                       "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("dtype,size,hint", [
    ("F8_E4M3", 1, "fp8 checkpoints are not supported"),
    ("U32", 4, "no \"quantization\" for it"),
    ("I64", 8, "expected BF16/F16/F32"),
])
def test_wrong_dtypes_are_refused(reference, tmp_path, dtype, size, hint):
    path = copy_of(reference, tmp_path)
    name = "model.decoder.layers.1.self_attn.q_proj.weight"
    retype(path, name, dtype, size)
    with pytest.raises(UserError, match=hint) as e:
        load_model(path)
    assert name in str(e.value)


@pytest.mark.parametrize("edit,hint", [
    (lambda c: c.update(quantization={"bits": 4}), "quantization.group_size is None"),
    (lambda c: c.update(quantization={"group_size": 64, "bits": "4"}), "quantization.bits is '4'"),
    (lambda c: c.update(quantization=[4]), "must be an object"),
    (lambda c: c.update(quantization_config={"quant_method": "fp8"}), "quant_method 'fp8'"),
])
def test_bad_quantization_config(reference, tmp_path, edit, hint):
    path = copy_of(reference, tmp_path)
    edit_config(path, edit)
    with pytest.raises(UserError, match=hint):
        load_model(path)


def test_quantization_block_that_contradicts_the_weights(tmp_path):
    make_reference(tmp_path / "hf", seed=5, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
                   head_dim=64, global_head_dim=64, vocab_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(tmp_path / "hf", tmp_path / "q4")
    edit_config(out, lambda c: c["quantization"].update(bits=3))
    with pytest.raises(UserError, match="experts.*has shape .* expected") as e:
        load_model(out)
    assert "\n" not in str(e.value)


def test_shape_mismatch_names_the_config_fields_once(reference, tmp_path):
    path = copy_of(reference, tmp_path)
    edit_config(path, lambda c: c["text_config"].update(vocab_size=VOCAB + 8))
    with pytest.raises(UserError) as e:
        load_model(path)
    message = str(e.value)
    assert "(set by config.json text_config.vocab_size x hidden_size)" in message
    assert message.count("set by") == 1
