"""Logits and committed tokens against the installed transformers reference."""

import numpy as np
import pytest
import torch
import mlx.core as mx
from transformers import DynamicCache

from mlx_diffusiongemma import load_model
from reference import make_reference, relative_error, to_numpy

# Three configurations that together cover sliding and full (K=V) layers, proportional
# RoPE, top-k > 1, distinct encoder/decoder scalars, prompts past the sliding window.
CONFIGS = {
    "base": dict(),
    "wide-window": dict(sliding_window=64, top_k_experts=3, num_experts=6,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        num_hidden_layers=3),
    "many-full": dict(num_global_key_value_heads=2, global_head_dim=48, top_k_experts=4, num_experts=4,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
                      sliding_window=8),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_reference(path, seed=len(request.param), embed_scale=0.3, **CONFIGS[request.param])
    return ref, load_model(path)


def ref_cache(ref):
    return DynamicCache(config=ref.config.get_text_config(decoder=True))


@pytest.mark.parametrize("grouped", [True, False], ids=["per-expert-gemm", "gather_mm"])
@pytest.mark.parametrize("prompt_len", [5, 15, 16, 17, 33])
def test_decoder_logits_after_prompt(pair, prompt_len, grouped, monkeypatch):
    ref, model = pair
    # Both MoE paths: per-expert GEMMs (CPU default) and the sorted gather_mm (GPU default).
    monkeypatch.setattr(model, "moe_grouped", grouped)
    rng = np.random.RandomState(prompt_len)
    prompt = rng.randint(0, 160, (1, prompt_len))
    canvas = rng.randint(0, 160, (1, 8))
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    ours = np.array(model.denoise(mx.array(canvas), cache))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(prompt), past_key_values=ref_cache(ref),
                     decoder_input_ids=torch.tensor(canvas)).logits
    assert ours.dtype == np.float32 and ours.shape == (1, 8, 160)
    assert relative_error(ours, to_numpy(theirs)) < 1e-4


@pytest.mark.parametrize("length", [1, 3, 5])
def test_decoder_logits_on_a_cut_final_canvas(pair, length):
    # `full_canvas=False` denoises a final canvas shorter than the config's canvas_length.
    ref, model = pair
    rng = np.random.RandomState(length)
    prompt, canvas = rng.randint(0, 160, (1, 19)), rng.randint(0, 160, (1, length))
    sc = rng.randn(1, length, 160).astype(np.float32) * 3
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    ours = np.array(model.denoise(mx.array(canvas), cache, mx.array(sc)))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(prompt), past_key_values=ref_cache(ref),
                     decoder_input_ids=torch.tensor(canvas), self_conditioning_logits=torch.tensor(sc)).logits
    assert ours.shape == (1, length, 160)
    assert relative_error(ours, to_numpy(theirs)) < 1e-4


def test_logits_after_committed_canvases_with_self_conditioning(pair):
    ref, model = pair
    rng = np.random.RandomState(7)
    prompt, canvases = rng.randint(0, 160, (1, 21)), rng.randint(0, 160, (3, 1, 8))
    cache, pkv = model.make_cache(), ref_cache(ref)
    model.encode(mx.array(prompt), cache)
    with torch.no_grad():
        ref.model.encoder(input_ids=torch.tensor(prompt), past_key_values=pkv)
        for canvas in canvases:
            model.encode(mx.array(canvas), cache)
            ref.model.encoder(input_ids=torch.tensor(canvas), past_key_values=pkv,
                              position_ids=torch.arange(pkv.get_seq_length(), pkv.get_seq_length() + 8)[None])
        sc = rng.randn(1, 8, 160).astype(np.float32) * 3
        query = rng.randint(0, 160, (1, 8))
        theirs = ref(past_key_values=pkv, decoder_input_ids=torch.tensor(query),
                     self_conditioning_logits=torch.tensor(sc)).logits
    ours = np.array(model.denoise(mx.array(query), cache, mx.array(sc)))
    assert relative_error(ours, to_numpy(theirs)) < 1e-4


def test_encode_and_denoise_batch_of_two(pair):
    _, model = pair
    rng = np.random.RandomState(3)
    prompts, canvases = rng.randint(0, 160, (2, 19)), rng.randint(0, 160, (2, 8))
    batched = model.make_cache()
    model.encode(mx.array(prompts), batched)
    together = np.array(model.denoise(mx.array(canvases), batched))
    for b in range(2):
        cache = model.make_cache()
        model.encode(mx.array(prompts[b : b + 1]), cache)
        alone = np.array(model.denoise(mx.array(canvases[b : b + 1]), cache))
        assert np.abs(together[b] - alone[0]).max() < 1e-5
