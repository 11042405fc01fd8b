"""The fused denoising loop (steps.py) gives exactly the reference loop's tokens for the
same seed, in the sampled regime; the fast-mode settings validate."""

import importlib

import mlx.core as mx
import pytest

from mlx_diffusiongemma import GenerationSettings, Model, ModelArgs, UserError, generate_step
from mlx_diffusiongemma.models.tiny import tiny_config

# The module, not the package's `generate` function of the same name.
generate_module = importlib.import_module("mlx_diffusiongemma.generate")

CANVAS = 16


@pytest.fixture(scope="module")
def model():
    mx.random.seed(3)
    # A sharper head than random init gives, so that steps accept several positions.
    m = Model(ModelArgs.from_config(tiny_config(CANVAS, vision=False)))
    m.model.decoder.embed_tokens.weight = m.model.decoder.embed_tokens.weight * 3
    mx.eval(m.parameters())
    return m


def run(model, prompt, old: bool, monkeypatch, **settings):
    if old:
        monkeypatch.setattr(generate_module, "_canvas_loop", lambda m, s: generate_module._denoise_canvas)
    events = list(generate_step(model, prompt, **settings))
    monkeypatch.undo()
    steps = [(e.canvas, e.step, e.argmax.tolist(), e.accepted, e.mean_entropy) for e in events if e.committed is None]
    return steps, [e.committed for e in events if e.committed is not None]


@pytest.mark.parametrize("settings", [
    dict(seed=1),
    dict(seed=2, t_min=0.8, t_max=1.6, entropy_bound=0.5, max_tokens=3 * CANVAS),
    dict(seed=3, pinned={2: 7, 20: 9}, max_tokens=2 * CANVAS, stability_threshold=2),
    dict(seed=5, pinned={CANVAS + 3: 9}, max_tokens=CANVAS + 5, full_canvas=False, min_canvas_length=1),
    dict(seed=7, sampler="confidence", threshold=0.5, max_tokens=2 * CANVAS),
    dict(seed=8, sampler="confidence", threshold=0.3, pinned={1: 4, 9: 12}, max_tokens=CANVAS),
    dict(seed=9, self_conditioning_top_k=4, max_tokens=2 * CANVAS),
])
def test_fused_loop_gives_the_reference_loop_tokens(model, settings, monkeypatch):
    prompt = [5, 17, 40, 99, 3, 12]
    old_steps, old_committed = run(model, prompt, True, monkeypatch, max_denoising_steps=10, **settings)
    new_steps, new_committed = run(model, prompt, False, monkeypatch, max_denoising_steps=10, **settings)
    assert new_committed == old_committed
    assert [s[:4] for s in new_steps] == [s[:4] for s in old_steps]
    assert [s[4] for s in new_steps] == pytest.approx([s[4] for s in old_steps], abs=1e-6)
    assert any(a > 1 for s in new_steps for a in [s[3]])  # the sampled regime accepted several


def test_fused_loop_gives_the_reference_loop_tokens_for_a_batch(model, monkeypatch):
    prompts = [[5, 17, 40], [8, 8, 150]]
    old = run(model, prompts, True, monkeypatch, seed=4, max_denoising_steps=8, max_tokens=2 * CANVAS)
    new = run(model, prompts, False, monkeypatch, seed=4, max_denoising_steps=8, max_tokens=2 * CANVAS)
    assert new[1] == old[1]
    assert [s[:4] for s in new[0]] == [s[:4] for s in old[0]]


def test_confidence_sampler_holds_revealed_positions_and_reveals_all_by_the_last_step(model):
    events = list(generate_step(model, [5, 17, 40], seed=0, sampler="confidence", threshold=0.5,
                                max_denoising_steps=6, max_tokens=CANVAS))
    steps = [e for e in events if e.committed is None]
    assert len(steps) <= 6 and sum(e.accepted for e in steps) == CANVAS
    # A revealed position keeps its token in every later draft.
    for before, after in zip(steps, steps[1:]):
        b, a = before.argmax.tolist(), after.argmax.tolist()
        assert sum(x == y for x, y in zip(b, a)) >= before_revealed(steps, before)
    assert events[-1].committed == steps[-1].argmax.tolist()


def before_revealed(steps, event):
    return sum(e.accepted for e in steps[: steps.index(event) + 1])


def test_fast_preset_caps_the_steps_and_explicit_values_win(model):
    cap = generate_module.FAST_PRESET["max_denoising_steps"]
    assert GenerationSettings.resolve(model).max_denoising_steps > cap
    assert GenerationSettings.resolve(model, fast=True).max_denoising_steps == cap
    assert GenerationSettings.resolve(model, fast=True, max_denoising_steps=30).max_denoising_steps == 30
    # A cap: a model with fewer steps of its own keeps them.
    few = GenerationSettings.resolve(model, max_denoising_steps=6)
    assert few.updated(fast=True).max_denoising_steps == 6


def test_top_k_self_conditioning_at_full_width_is_the_full_signal(model):
    cache = model.make_cache()
    model.encode(mx.array([[5, 17, 40]]), cache)
    canvas = mx.array([list(range(3, 3 + CANVAS))])
    scaled = model.denoise(canvas, cache) / 0.7
    probs = mx.softmax(scaled, axis=-1)
    full = model.denoise(canvas, cache, scaled, self_conditioning_probs=probs)
    top = model.denoise(canvas, cache, scaled, self_conditioning_probs=probs,
                        self_conditioning_top_k=model.args.vocab_size)
    assert mx.allclose(top, full, atol=1e-4).item()
    assert not mx.allclose(model.denoise(canvas, cache, scaled, self_conditioning_top_k=1), full, atol=1e-4).item()


def canvases(model, **settings):
    events = list(generate_step(model, [5, 17, 40], **{"seed": 6, "max_denoising_steps": 6, **settings}))
    drafts = [(e.canvas, e.argmax.tolist()) for e in events if e.committed is None]
    return drafts, [e.committed for e in events if e.committed is not None]


@pytest.mark.parametrize("least, final", [(1, 5), (4, 5), (8, 8), (CANVAS, CANVAS), (64, CANVAS)])
def test_a_cut_final_canvas_holds_what_remains_and_commits_exactly_max_tokens(model, least, final):
    drafts, committed = canvases(model, max_tokens=CANVAS + 5, full_canvas=False, min_canvas_length=least)
    assert {len(d) for c, d in drafts if c == 0} == {CANVAS}
    assert {len(d) for c, d in drafts if c == 1} == {final}
    assert [len(c) for c in committed] == [CANVAS, 5]
    # The cut canvas ends the same key chain: the first canvas is the whole-canvas run's.
    whole, whole_committed = canvases(model, max_tokens=CANVAS + 5)
    assert [d for d in drafts if d[0] == 0] == [d for d in whole if d[0] == 0]
    assert committed[0] == whole_committed[0] and [len(c) for c in whole_committed] == [CANVAS, CANVAS]


def test_the_context_check_counts_a_cut_final_canvas_as_cut(model):
    context = model.args.max_position_embeddings
    prompt = [5] * (context - CANVAS - 5)  # room for one whole canvas and 5 more positions
    settings = dict(max_tokens=CANVAS + 5, max_denoising_steps=1, seed=0)
    with pytest.raises(UserError, match="2 canvases .32 positions. = 4107 tokens exceeds"):
        next(generate_step(model, prompt, **settings))
    committed = [e.committed for e in generate_step(model, prompt, full_canvas=False, min_canvas_length=1, **settings)
                 if e.committed is not None]
    assert [len(c) for c in committed] == [CANVAS, 5]


def test_full_canvas_off_changes_nothing_when_max_tokens_fills_whole_canvases(model):
    assert canvases(model, max_tokens=2 * CANVAS, full_canvas=False) == canvases(model, max_tokens=2 * CANVAS)


def test_a_cut_first_canvas_starts_from_the_initial_canvas_s_first_tokens(model):
    initial = list(range(10, 10 + CANVAS))
    drafts, committed = canvases(model, max_tokens=6, full_canvas=False, min_canvas_length=1,
                                 initial_canvas=initial, max_denoising_steps=1)
    cache = model.make_cache()
    model.encode(mx.array([[5, 17, 40]]), cache)
    first_forward = mx.argmax(model.denoise(mx.array([initial[:6]]), cache), axis=-1)
    assert drafts == [(0, first_forward[0].tolist())]
    assert committed == [first_forward[0].tolist()]


@pytest.mark.parametrize("bad, words", [
    (dict(sampler="greedy"), "sampler must be one of entropy, confidence"),
    (dict(threshold=0.0), "threshold must be in (0, 1]"),
    (dict(threshold=1.5), "threshold must be in (0, 1]"),
    (dict(self_conditioning_top_k=-1), "self_conditioning_top_k must be an integer"),
    (dict(self_conditioning_top_k=10**6), "self_conditioning_top_k must be an integer"),
    (dict(fast="yes"), "fast must be True or False"),
    (dict(full_canvas="no"), "full_canvas must be True or False"),
    (dict(min_canvas_length=0), "min_canvas_length must be an integer >= 1"),
    (dict(min_canvas_length=2.5), "min_canvas_length must be an integer >= 1"),
    (dict(min_canvas_length=True), "min_canvas_length must be an integer >= 1"),
])
def test_bad_fast_mode_settings_are_one_line_errors(model, bad, words):
    with pytest.raises(UserError) as e:
        GenerationSettings.resolve(model, **bad)
    assert words in str(e.value) and "\n" not in str(e.value)
