"""`generate_step` commits exactly the reference's tokens in the deterministic regime:
the same initial canvas every canvas, every position accepted, near-zero temperature."""

import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma import generation_diffusion_gemma as ref_generation

from mlx_diffusiongemma import generate_step, load_model
from reference import make_reference

CANVAS = 8
DETERMINISTIC = dict(t_max=2e-3, t_min=1e-3, entropy_bound=1e9, max_denoising_steps=12)


def reference_generate(ref, prompt, initial, eos, max_tokens, monkeypatch):
    monkeypatch.setattr(
        ref_generation.EntropyBoundSampler, "initialize_canvas",
        lambda self, batch_size, device: torch.tensor([initial]),
    )
    config = ref_generation.EntropyBoundSamplerConfig(entropy_bound=1e9)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, sampler_config=config,
            t_max=2e-3, t_min=1e-3, max_denoising_steps=12, stability_threshold=1,
            confidence_threshold=0.005, eos_token_id=eos, pad_token_id=0,
        )
    return out.sequences[0, len(prompt):].tolist()


def our_generate(model, prompt, initial, eos, max_tokens):
    committed = []
    for event in generate_step(model, prompt, initial_canvas=initial, eos_token_ids=eos,
                               max_tokens=max_tokens, seed=0, **DETERMINISTIC):
        if event.committed is not None:
            committed += event.committed
    return committed


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    # A window shorter than prompt + canvases makes the sliding cache wrap during generation.
    ref = make_reference(path, seed=11, embed_scale=0.6, sliding_window=12)
    return ref, load_model(path)


@pytest.mark.parametrize("prompt_len", [3, 11, 12, 13, 25])
def test_commits_reference_tokens_over_four_canvases(pair, prompt_len, monkeypatch):
    ref, model = pair
    rng = np.random.RandomState(prompt_len)
    prompt = rng.randint(5, 160, prompt_len).tolist()
    initial = rng.randint(5, 160, CANVAS).tolist()
    theirs = reference_generate(ref, prompt, initial, [159], 4 * CANVAS, monkeypatch)
    ours = our_generate(model, prompt, initial, [159], 4 * CANVAS)
    assert len(theirs) == 4 * CANVAS
    assert ours == theirs


def test_eos_ends_generation_and_pads_like_reference(pair, monkeypatch):
    ref, model = pair
    rng = np.random.RandomState(5)
    prompt, initial = rng.randint(5, 160, 9).tolist(), rng.randint(5, 160, CANVAS).tolist()
    free_run = reference_generate(ref, prompt, initial, [], 4 * CANVAS, monkeypatch)
    # An EOS id that first appears mid-way through the third canvas.
    third = free_run[2 * CANVAS : 3 * CANVAS]
    eos = next(t for t in third[1:-1] if t not in free_run[: 2 * CANVAS] + third[: third.index(t)])
    theirs = reference_generate(ref, prompt, initial, [eos], 4 * CANVAS, monkeypatch)
    ours = our_generate(model, prompt, initial, [eos], 4 * CANVAS)
    assert ours == theirs
    assert len(ours) == 3 * CANVAS and eos in ours and ours[-1] == 0
