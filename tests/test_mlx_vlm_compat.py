"""mlx-vlm conversions load here unchanged, and ours load in mlx-vlm: same tensor names,
same `quantization` block, same logits."""

import json
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_vlm.convert import convert as vlm_convert
from mlx_vlm.utils import load_model as vlm_load_model

from mlx_diffusiongemma import load_model
from mlx_diffusiongemma.convert import convert
from reference import make_reference, relative_error

# Multiples of 64 so mlx-vlm's recipe quantizes every text layer; full-attention layers
# have their own head dim and KV heads.
DIMS = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, head_dim=64,
            global_head_dim=128, num_global_key_value_heads=1, vocab_size=256)


def released_style_config(path: Path) -> None:
    """Write the full-attention shapes as the released config.json does (mlx-vlm reads
    `global_head_dim`, not the `per_layer_config` that `save_pretrained` writes)."""
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    text.pop("per_layer_config")
    text.update(global_head_dim=DIMS["global_head_dim"], num_global_key_value_heads=DIMS["num_global_key_value_heads"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    make_reference(root / "hf", seed=6, canvas_length=16, embed_scale=0.3, **DIMS)
    released_style_config(root / "hf")
    vlm_convert(str(root / "hf"), str(root / "vlm"), quantize=True)  # its default 4-bit recipe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(root / "hf", root / "ours")
    return root


def vlm_logits(model, prompt, canvas, sc=None) -> np.ndarray:
    out = model(input_ids=mx.array(prompt), cache=model.make_cache(), canvas_ids=mx.array(canvas),
                self_conditioning_logits=sc)
    return np.array(out.logits)


def our_logits(model, prompt, canvas, sc=None) -> np.ndarray:
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    return np.array(model.denoise(mx.array(canvas), cache, sc))


def inputs(seed: int):
    rng = np.random.RandomState(seed)
    sc = mx.array(rng.randn(1, 16, 256).astype(np.float32) * 3)
    return rng.randint(0, 256, (1, 21)), rng.randint(0, 256, (1, 16)), sc


def test_mlx_vlm_conversion_loads_unchanged_and_matches_its_forward(checkpoints):
    config = json.loads((checkpoints / "vlm" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    ours = load_model(checkpoints / "vlm")
    theirs = vlm_load_model(checkpoints / "vlm")
    layer = ours.layers[1]
    assert layer.experts.gate_up_proj.bits == 4 and layer.self_attn.q_proj.bits == 8
    assert ours.model.decoder.embed_tokens.bits == 8
    prompt, canvas, sc = inputs(0)
    # Prompt past the 16-token sliding window; first step, then with self-conditioning.
    a, b = our_logits(ours, prompt, canvas), vlm_logits(theirs, prompt, canvas)
    assert relative_error(a, b) < 1e-4 and a.std() > 0.1
    assert relative_error(our_logits(ours, prompt, canvas, sc), vlm_logits(theirs, prompt, canvas, sc)) < 1e-4


def test_mlx_vlm_conversion_loads_text_only(checkpoints):
    model = load_model(checkpoints / "vlm", text_only=True)
    assert "vision_tower" not in model.model.encoder


def test_our_conversion_loads_in_mlx_vlm(checkpoints):
    ours = load_model(checkpoints / "ours")
    theirs = vlm_load_model(checkpoints / "ours")
    assert theirs.model.decoder.self_conditioning.up_proj.bits == 8
    prompt, canvas, _ = inputs(1)
    assert relative_error(our_logits(ours, prompt, canvas), vlm_logits(theirs, prompt, canvas)) < 1e-4
