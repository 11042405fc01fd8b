"""convert(): round trips against the reference, the quantization recipes, the released
index, and bad inputs that must end in one clear error with nothing left behind."""

import copy
import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors import safe_open
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import DynamicCache

import mlx_diffusiongemma.convert as convert_module
from mlx_diffusiongemma import UserError, load_model
from mlx_diffusiongemma.weights.safetensors import INDEX_NAME, list_checkpoint, read_header
from mlx_diffusiongemma.convert import convert, read_source, plan_conversion, quantization_block, recipe_default
from reference import make_reference, relative_error, to_numpy
from test_checkpoint import RELEASE, released_checkpoint

# Dimensions that are multiples of 64, so every text layer really gets quantized.
Q64 = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, head_dim=64,
           global_head_dim=128, vocab_size=256)
REPO_ROOT = Path(__file__).resolve().parents[1]
# The random checkpoints have no tokenizer; one test checks that this warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    return path, make_reference(path, seed=1, canvas_length=16, **Q64)


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    """The reference converted without quantization (float32) and with each recipe."""
    src, _ = reference
    root = tmp_path_factory.mktemp("mlx")
    settings = {"f32": dict(quantize=False, dtype="float32"), "4bit": {}, "8bit": dict(recipe="8bit")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random checkpoint has no tokenizer
        return {name: convert(src, root / name, **kw) for name, kw in settings.items()}


def canvas_logits(model, seed: int = 0, trials: int = 8) -> mx.array:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(trials):
        prompt, canvas = rng.randint(0, 256, (1, 40)), rng.randint(0, 256, (1, 16))
        cache = model.make_cache()
        model.encode(mx.array(prompt), cache)
        out.append(model.denoise(mx.array(canvas), cache))
    return mx.concatenate(out, axis=0)


def kl_and_top1(p_logits: mx.array, q_logits: mx.array) -> tuple[float, float]:
    lp = p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True)
    lq = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    kl = (mx.exp(lp) * (lp - lq)).sum(axis=-1).mean().item()
    top1 = (p_logits.argmax(-1) == q_logits.argmax(-1)).astype(mx.float32).mean().item()
    return kl, top1


# ---------------------------------------------------------------------------------------
# Round trips


def test_float32_conversion_matches_the_reference(reference, converted):
    _, ref = reference
    model = load_model(converted["f32"])
    rng = np.random.RandomState(0)
    prompt, canvas = rng.randint(0, 256, (1, 21)), rng.randint(0, 256, (1, 16))
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    ours = np.array(model.denoise(mx.array(canvas), cache))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(prompt), past_key_values=DynamicCache(config=ref.config.get_text_config(decoder=True)),
                     decoder_input_ids=torch.tensor(canvas)).logits
    assert relative_error(ours, to_numpy(theirs)) < 1e-4


def test_output_layout(reference, converted):
    src, _ = reference
    out = converted["f32"]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", INDEX_NAME]
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "float32"
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    index = json.loads((out / INDEX_NAME).read_text())
    infos = list_checkpoint(out)
    assert set(index["weight_map"]) == set(infos)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in infos.values())
    assert {i.dtype for i in infos.values()} == {"F32"}
    assert min(i.start for i in infos.values()) % 8 == 0  # the data region is aligned
    with safe_open(out / "model.safetensors", "numpy") as f:  # the reference reader agrees
        assert f.metadata() == {"format": "mlx"} and len(f.keys()) == len(infos)


def test_default_recipe_stays_close_to_the_unquantized_model(converted):
    base = canvas_logits(load_model(converted["f32"]))
    kl4, top4 = kl_and_top1(base, canvas_logits(load_model(converted["4bit"])))
    kl8, top8 = kl_and_top1(base, canvas_logits(load_model(converted["8bit"])))
    # Measured: 4-bit KL 0.30 / top-1 0.84, 8-bit KL 0.11 / top-1 0.89 on this random model
    # (its routers flip under any perturbation); 3-bit gives 0.79, unrelated logits > 10.
    assert kl4 < 0.6 and top4 > 0.75
    assert kl8 < kl4 and kl8 < 0.25 and top8 > 0.8


def test_default_recipe_layers_and_weights(reference, converted):
    model = load_model(converted["4bit"])
    layer = model.layers[1]
    assert layer.experts.gate_up_proj.bits == 4 and layer.experts.down_proj.bits == 4
    for module in (layer.self_attn.q_proj, layer.mlp.down_proj, layer.router.proj,
                   model.model.decoder.embed_tokens, model.model.decoder.self_conditioning.up_proj):
        assert (module.bits, module.group_size) == (8, 64)
    assert isinstance(model.model.encoder.vision_tower.encoder.layers[0].mlp.up_proj.linear, nn.Linear)
    # Dequantized weights stay within the error of their bit width of the source weights.
    src, _ = reference
    source = {k: v for f in src.glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    for name, module, bound in [
        ("model.decoder.layers.1.experts.gate_up_proj", layer.experts.gate_up_proj, 0.12),
        ("model.decoder.layers.1.self_attn.o_proj.weight", layer.self_attn.o_proj, 0.01),
        ("model.decoder.embed_tokens.weight", model.model.decoder.embed_tokens, 0.01),
    ]:
        w = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
        err = (mx.abs(w - source[name]).mean() / mx.abs(source[name]).mean()).item()
        assert err < bound, name


def test_quantization_block_matches_mlx_lm_layout(converted):
    q = json.loads((converted["4bit"] / "config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert q["model.decoder.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 8}
    assert q["model.decoder.embed_tokens"] == {"group_size": 64, "bits": 8}
    assert "model.decoder.layers.0.experts.gate_up_proj" not in q  # the default applies
    assert not any("vision" in k or "norm" in k for k in q)
    q8 = json.loads((converted["8bit"] / "config.json").read_text())["quantization"]
    assert q8 == {"group_size": 64, "bits": 8, "mode": "affine"}


def test_text_only_output_has_no_vision(reference, tmp_path):
    src, _ = reference
    out = convert(src, tmp_path / "text", text_only=True, quantize=False, dtype="float32")
    assert not any("vision" in name for name in list_checkpoint(out))
    assert "vision_config" not in json.loads((out / "config.json").read_text())
    assert "vision_tower" not in load_model(out).model.encoder


def test_output_shards_are_bounded_and_progress_counts_input_bytes(reference, tmp_path):
    src, _ = reference
    calls = []
    out = convert(src, tmp_path / "sharded", max_shard_bytes=200_000, progress=lambda d, t: calls.append((d, t)))
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for shard in shards:
        infos = read_header(shard)
        if sum(i.nbytes for i in infos.values()) > 200_000:
            assert len(infos) == 1  # a tensor larger than the bound gets a shard of its own
    total = sum(i.nbytes for i in list_checkpoint(src).values())
    assert calls[-1] == (total, total) and all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    sharded = dict(tree_flatten(load_model(out, text_only=True).parameters()))
    whole = dict(tree_flatten(load_model(convert(src, tmp_path / "whole"), text_only=True).parameters()))
    assert sharded.keys() == whole.keys() and all(mx.array_equal(sharded[k], whole[k]).item() for k in whole)


def test_tokenizer_files_are_copied(reference, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(reference[0], src)
    # The smallest tokenizer that loads: convert refuses tokenizer files it cannot load.
    tokenizer = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    tokenizer.save(str(src / "tokenizer.json"))
    for name, text in [("tokenizer_config.json", "{}"), ("chat_template.jinja", "{{ x }}")]:
        (src / name).write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert(src, tmp_path / "out", quantize=False)
    assert (out / "chat_template.jinja").read_text() == "{{ x }}" and (out / "tokenizer.json").exists()


def test_missing_tokenizer_is_a_warning(reference, tmp_path):
    with pytest.warns(UserWarning, match="tokenizer.json"):
        convert(reference[0], tmp_path / "out", quantize=False)


def test_bfloat16_output(reference, tmp_path):
    out = convert(reference[0], tmp_path / "bf16", quantize=False, dtype="bfloat16", text_only=True)
    assert {i.dtype for i in list_checkpoint(out).values()} == {"BF16"}
    assert load_model(out).model.decoder.embed_tokens.weight.dtype == mx.bfloat16


def test_chunked_reading_writes_the_same_bytes(reference, converted, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "CHUNK_BYTES", 1000)  # several chunks per tensor, some of one row
    out = convert(reference[0], tmp_path / "chunked")
    assert (out / "model.safetensors").read_bytes() == (converted["4bit"] / "model.safetensors").read_bytes()


def test_bfloat16_input_is_read_exactly(reference, tmp_path):
    src, ref = reference
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path / "hf-bf16", max_shard_size="40KB")
    out = convert(tmp_path / "hf-bf16", tmp_path / "f32", quantize=False, dtype="float32")
    source = {k: v for f in (tmp_path / "hf-bf16").glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    result = mx.load(str(out / "model.safetensors"))
    name = "model.decoder.layers.0.experts.gate_up_proj"
    assert source[name].dtype == mx.bfloat16 and result[name + ".weight"].dtype == mx.float32
    assert mx.array_equal(source[name].astype(mx.float32), result[name + ".weight"])


# ---------------------------------------------------------------------------------------
# The released checkpoint, on paper


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    released_checkpoint(path, json.loads((RELEASE / "tensor_shapes.json").read_text()))
    for name in ("config.json", "generation_config.json"):
        shutil.copy(RELEASE / name, path / name)
    return path


def test_released_index_passes_validation_and_plans_a_4bit_model(release_dir):
    source = read_source(release_dir)
    assert len(source.infos) == 1047
    plans = plan_conversion(source.model, source.infos)
    bits = {p.name: (p.quant or {}).get("bits") for p in plans}
    assert bits["model.decoder.layers.5.experts.down_proj.weight"] == 4
    assert bits["model.decoder.layers.5.self_attn.q_proj.weight"] == 8
    assert bits["model.decoder.embed_tokens.weight"] == 8
    assert bits["model.decoder.layers.5.router.proj.weight"] == 8
    assert bits["model.encoder.language_model.layers.5.layer_scalar"] is None
    assert not any(b for name, b in bits.items() if "vision" in name or "norm" in name)
    total = sum(p.nbytes for p in plans)
    assert 16.4e9 < total < 16.7e9  # 15.4 GB of text weights + 1.15 GB of bf16 vision tower
    text = read_source(release_dir, text_only=True)
    assert len(text.infos) == 691 and sum(p.nbytes for p in plan_conversion(text.model, text.infos)) < 15.5e9


def test_released_group_size_128_is_refused_by_name(release_dir):
    source = read_source(release_dir, text_only=True)
    with pytest.raises(UserError, match=r"experts.down_proj: its input dimension 704 .* group size 128; use q_group_size 32 or 64"):
        plan_conversion(source.model, source.infos, q_group_size=128)


def test_quantization_block_lists_only_layers_that_differ(release_dir):
    source = read_source(release_dir, text_only=True)
    plans = plan_conversion(source.model, source.infos, q_bits=3)
    block = quantization_block(plans, recipe_default(3, 64, "mixed"))
    assert block["bits"] == 3 and len(block) == 3 + 239  # 8-bit layers: 30 x 7 + embed + 3 self-cond + 25 v_proj
    assert all(v == {"group_size": 64, "bits": 8} for k, v in block.items() if "." in k)


# ---------------------------------------------------------------------------------------
# Bad inputs: one line, the file or tensor named, and no output left behind


@pytest.fixture
def bad(reference, tmp_path):
    """A writable copy of the reference checkpoint."""
    src = tmp_path / "src"
    shutil.copytree(reference[0], src)
    return src


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "src")


def convert_error(src: Path, **kwargs) -> str:
    out = src.parent / "out"
    with pytest.raises(UserError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, out, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    assert leftovers(src.parent) == [], "no output and no partial directory"
    return message


def largest_shard(src: Path) -> Path:
    return max(src.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)


def shard_of(src: Path, tensor: str) -> Path:
    return src / json.loads((src / INDEX_NAME).read_text())["weight_map"][tensor]


def rewrite(path: Path, edit) -> None:
    """Rewrite a shard by hand: `edit(tensors)` changes {name: (dtype, shape, bytes)} in place."""
    with safe_open(path, "numpy") as f:
        tensors = {k: ("F32", list(f.get_tensor(k).shape), f.get_tensor(k).tobytes()) for k in f.keys()}
    edit(tensors)
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    write_raw(path, header, data)


def write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_truncated_shard(bad):
    shard = largest_shard(bad)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    message = convert_error(bad)
    assert "truncated" in message and shard.name in message


def test_empty_shard(bad):
    shard = largest_shard(bad)
    shard.write_bytes(b"")
    assert "empty" in convert_error(bad)


def test_html_page_saved_as_shard(bad):
    largest_shard(bad).write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    assert "HTML page" in convert_error(bad)


def test_lfs_pointer_saved_as_shard(bad):
    largest_shard(bad).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2621616\n")
    assert "git lfs pull" in convert_error(bad)


def test_missing_tensor(bad):
    name = "model.decoder.layers.2.mlp.up_proj.weight"
    shard = shard_of(bad, name)
    rewrite(shard, lambda t: t.pop(name))
    index = json.loads((bad / INDEX_NAME).read_text())
    del index["weight_map"][name]
    (bad / INDEX_NAME).write_text(json.dumps(index))
    message = convert_error(bad)
    assert "missing 1 of the" in message and name in message


def test_unexpected_tensor(bad):
    name = "model.decoder.layers.0.mlp.up_proj.weight"
    shard = shard_of(bad, name)
    rewrite(shard, lambda t: t.update({"model.decoder.layers.0.mlp.extra.weight": t[name]}))
    index = json.loads((bad / INDEX_NAME).read_text())
    index["weight_map"]["model.decoder.layers.0.mlp.extra.weight"] = shard.name
    (bad / INDEX_NAME).write_text(json.dumps(index))
    message = convert_error(bad)
    assert "does not use" in message and "mlp.extra.weight" in message


def test_tensor_with_wrong_shape(bad):
    name = "model.decoder.layers.0.mlp.gate_proj.weight"

    def edit(t):
        dtype, (rows, cols), raw = t[name]
        t[name] = (dtype, [rows - 1, cols], raw[: (rows - 1) * cols * 4])

    rewrite(shard_of(bad, name), edit)
    message = convert_error(bad)
    assert name in message and "[127, 128]" in message and "expected [128, 128]" in message


@pytest.mark.parametrize("dtype,size,hint", [("F8_E4M3", 1, "fp8"), ("I32", 4, "expected BF16/F16/F32"), ("F64", 8, "F64")])
def test_wrong_dtype(bad, dtype, size, hint):
    name = "model.decoder.layers.0.self_attn.q_proj.weight"

    def edit(t):
        _, shape, _ = t[name]
        t[name] = (dtype, shape, b"\0" * (int(np.prod(shape)) * size))

    rewrite(shard_of(bad, name), edit)
    message = convert_error(bad)
    assert name in message and dtype in message and hint in message


def test_overlapping_offsets(bad):
    shard = next(s for s in bad.glob("model-*.safetensors") if len(read_header(s)) >= 2)
    with safe_open(shard, "numpy") as f:
        first, second = list(f.keys())[:2]
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8 : 8 + header_len])
    data = shard.read_bytes()[8 + header_len :]
    a, b = header[first]["data_offsets"], header[second]["data_offsets"]
    lo = min(a[0], b[0])
    header[first]["data_offsets"] = [lo, lo + a[1] - a[0]]
    header[second]["data_offsets"] = [lo, lo + b[1] - b[0]]
    write_raw(shard, header, data)
    assert "overlap" in convert_error(bad)


def test_index_pointing_outside_the_directory(bad):
    index = json.loads((bad / INDEX_NAME).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere/model.safetensors"
    (bad / INDEX_NAME).write_text(json.dumps(index))
    assert "outside" in convert_error(bad)


def test_shard_listed_but_missing(bad):
    shard = largest_shard(bad)
    shard.unlink()
    assert shard.name in convert_error(bad)


@pytest.mark.parametrize("edit,hint", [
    (lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
    (lambda c: c["text_config"].pop("num_experts"), "text_config.num_experts"),
    (lambda c: c.update(quantization={"group_size": 64, "bits": 4}), "already an MLX conversion"),
    (lambda c: c.update(quantization_config={"quant_method": "fp8"}), "quant_method 'fp8'"),
])
def test_bad_config(bad, edit, hint):
    config = json.loads((bad / "config.json").read_text())
    edit(config)
    (bad / "config.json").write_text(json.dumps(config))
    assert hint in convert_error(bad)


def test_missing_or_invalid_config(bad):
    (bad / "config.json").write_text("{not json")
    assert "not valid JSON" in convert_error(bad)
    (bad / "config.json").unlink()
    assert "config.json is missing" in convert_error(bad)


def test_unquantizable_layer_is_named(tmp_path):
    src = tmp_path / "src"
    make_reference(src, seed=2)  # moe_intermediate_size 32: experts.down_proj cannot take group 64
    message = convert_error(src)
    assert "experts.down_proj: its input dimension 32 is not a multiple of the group size 64" in message
    assert "q_group_size 32" in message


@pytest.mark.parametrize("kwargs,hint", [
    (dict(q_bits=7), "q_bits=7"), (dict(q_group_size=48), "q_group_size=48"),
    (dict(recipe="4bit"), "recipe '4bit'"), (dict(dtype="int8"), "dtype 'int8'"),
])
def test_bad_settings(bad, kwargs, hint):
    assert hint in convert_error(bad, **kwargs)


def test_output_that_would_replace_the_input_is_refused(bad):
    for out in (bad, bad.parent):
        with pytest.raises(UserError, match="contains the input checkpoint"):
            convert(bad, out, overwrite=True)
    assert (bad / "config.json").exists()


def test_rich_progress_bar_goes_to_stderr(reference, tmp_path, capsys):
    convert(reference[0], tmp_path / "out", quantize=False, progress="rich")
    captured = capsys.readouterr()
    assert captured.out == "" and "Converting" in captured.err and "MB" in captured.err


def test_interrupted_conversion_leaves_nothing(bad):
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(bad, bad.parent / "out", progress=interrupt)
    assert leftovers(bad.parent) == []


FULL_DISK = textwrap.dedent("""
    import resource, sys, warnings
    warnings.simplefilter("ignore")
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
    from mlx_diffusiongemma import UserError
    from mlx_diffusiongemma.convert import convert
    try:
        convert(sys.argv[1], sys.argv[2])
    except UserError as e:
        print(e)
        sys.exit(3)
""")


def test_full_disk_leaves_nothing(bad):
    # The vision tower's float32 position table alone is 2.6 MB, past the 1 MB file-size limit.
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(bad), str(bad.parent / "out")],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert run.returncode == 3, run.stderr
    assert "ran out of disk space" in run.stdout
    assert leftovers(bad.parent) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(bad):
    out = bad.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty; choose another path or allow overwriting it"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(bad, out)
    assert (out / "keep.txt").read_text() == "mine"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(bad, out, overwrite=True, quantize=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert leftovers(bad.parent) == ["out"]
