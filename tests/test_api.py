"""The Python API: released-checkpoint name mapping, seeding and bad input."""

import json
import shutil
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from mlx_diffusiongemma import GenerationSettings, Model, ModelArgs, UserError, generate_step, load_model
from reference import make_reference

RELEASED = Path(__file__).parent / "data" / "diffusiongemma-26B-A4B-it"


def test_released_config_maps_to_exactly_the_released_tensors():
    config = json.loads((RELEASED / "config.json").read_text())
    shapes = json.loads((RELEASED / "tensor_shapes.json").read_text())
    index = json.loads((RELEASED / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(shapes) == set(index)
    model = Model(ModelArgs.from_config(config))  # lazy: no weights are materialized
    ours = {name: tuple(a.shape) for name, a in tree_flatten(model.parameters())}
    assert ours == {name: tuple(s) for name, s in model.sanitize(shapes).items()}


def test_released_generation_config_gives_the_reference_defaults():
    config = json.loads((RELEASED / "config.json").read_text())
    generation = json.loads((RELEASED / "generation_config.json").read_text())
    model = Model(ModelArgs.from_config(config, generation))
    s = GenerationSettings.resolve(model)
    assert (s.max_denoising_steps, s.t_min, s.t_max, s.entropy_bound) == (48, 0.4, 0.8, 0.1)
    assert (s.stability_threshold, s.confidence_threshold, s.eos_token_ids) == (1, 0.005, (1, 106, 50))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_reference(path, seed=2)
    return path, load_model(path)


def committed(model, prompt, **settings):
    return [e.committed for e in generate_step(model, prompt, max_tokens=16, **settings) if e.committed]


def test_same_seed_reproduces_and_different_seeds_differ(tiny):
    _, model = tiny
    a = committed(model, [5, 6, 7], seed=1, eos_token_ids=[])
    assert a == committed(model, [5, 6, 7], seed=1, eos_token_ids=[])
    assert a != committed(model, [5, 6, 7], seed=2, eos_token_ids=[])


def test_step_events_count_down_steps_and_report_acceptance(tiny):
    _, model = tiny
    events = list(generate_step(model, [5, 6, 7], max_tokens=8, seed=0, max_denoising_steps=5, eos_token_ids=[]))
    steps = [e for e in events if e.committed is None]
    assert [e.step for e in steps] == list(range(1, len(steps) + 1)) and len(steps) <= 5
    assert all(0 < e.accepted <= 8 and e.mean_entropy >= 0 for e in steps)
    assert events[-1].committed == events[-2].argmax.tolist() and events[-1].finish_reason == "length"


@pytest.mark.parametrize("settings, words", [
    (dict(max_denoising_steps=-1), "max_denoising_steps"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(t_max=0.3, t_min=0.4), "t_max"),
    (dict(t_min=-0.1), "temperatures"),
    (dict(entropy_bound=0), "entropy_bound"),
    (dict(confidence_threshold=-1.0), "confidence_threshold"),
    (dict(initial_canvas=[1, 2]), "initial_canvas"),
    (dict(eos_token_ids=[10_000]), "eos_token_ids"),
    (dict(temperature=1.0), "unknown generation setting"),
])
def test_settings_out_of_range_are_one_line_errors(tiny, settings, words):
    _, model = tiny
    with pytest.raises(UserError, match=words) as e:
        next(generate_step(model, [5, 6], **settings))
    assert "\n" not in str(e.value)


def test_prompt_errors(tiny):
    _, model = tiny
    with pytest.raises(UserError, match="empty"):
        next(generate_step(model, []))
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        next(generate_step(model, [5, 160]))
    with pytest.raises(UserError, match="exceeds the model's context"):
        next(generate_step(model, [5] * 4000, max_tokens=200))


def test_context_counts_the_output_in_whole_canvases(tiny):
    """A prompt that leaves room for exactly one canvas runs with max_tokens=1; one token
    longer, or a second canvas's worth of max_tokens, is refused."""
    _, model = tiny
    L, M = model.args.canvas_length, model.args.max_position_embeddings
    next(generate_step(model, [5] * (M - L), max_tokens=1, max_denoising_steps=1))
    for prompt, max_tokens in ((M - L + 1, 1), (M - 2 * L + 1, L + 1)):
        with pytest.raises(UserError, match="exceeds the model's context"):
            next(generate_step(model, [5] * prompt, max_tokens=max_tokens))


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="config.json is missing"):
        load_model(tmp_path)


def test_missing_directory_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")


def edited_copy(tiny, tmp_path, edit) -> Path:
    src, _ = tiny
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unknown_model_type(tiny, tmp_path):
    path = edited_copy(tiny, tmp_path, lambda c: c.update(model_type="llama"))
    with pytest.raises(UserError, match="model_type is 'llama'"):
        load_model(path)


def test_missing_required_field_is_named(tiny, tmp_path):
    path = edited_copy(tiny, tmp_path, lambda c: c["text_config"].pop("num_experts"))
    with pytest.raises(UserError, match="text_config.num_experts"):
        load_model(path)


def test_config_contradicting_the_weights(tiny, tmp_path):
    path = edited_copy(tiny, tmp_path, lambda c: c["text_config"].update(moe_intermediate_size=48))
    with pytest.raises(UserError, match="experts.*moe_intermediate_size") as e:
        load_model(path)
    assert "\n" not in str(e.value)
