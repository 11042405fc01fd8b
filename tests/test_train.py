import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_diffusiongemma.loading import load_model
from mlx_diffusiongemma.models import Model, ModelArgs
from mlx_diffusiongemma.models.tiny import tiny_config
from mlx_diffusiongemma.tuner.trainer import (
    TrainingArgs, checkpoint_weights, corrupt, diffusion_loss, encoded_cache, make_trainable,
    save_checkpoint, train,
)

# Smaller than the shared tiny config: two layers, a 64-token vocabulary, short context.
CONFIG = tiny_config(
    vision=False, vocab_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    global_head_dim=64, layer_types=["sliding_attention", "full_attention"], sliding_window=4, num_experts=4,
    max_position_embeddings=256,
)


def tiny_model(seed: int = 0) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_config(CONFIG))
    mx.eval(model.parameters())
    return model


def batch(seed: int = 1, B: int = 4):
    key = mx.random.key(seed)
    prompts = mx.random.randint(5, 64, (B, 10), key=key)
    # A mapping that takes the encoder: the canvas repeats the prompt's first token.
    return prompts, mx.repeat(prompts[:, :1], 8, axis=1)


def test_corrupt_replaces_a_per_row_fraction_with_uniform_tokens():
    targets = mx.zeros((64, 512), dtype=mx.int32)
    noisy, replaced = corrupt(targets, 1000, mx.random.key(0))
    fractions = replaced.mean(axis=1)
    assert fractions.min().item() < 0.2 and fractions.max().item() > 0.8
    assert mx.array_equal(mx.where(replaced, 0, noisy), targets)
    assert noisy.max().item() > 900 and noisy.dtype == mx.int32


def test_noise_exponent_below_one_leans_toward_heavy_corruption():
    targets = mx.zeros((512, 256), dtype=mx.int32)
    uniform = corrupt(targets, 1000, mx.random.key(0))[1].mean(axis=1)
    skewed = corrupt(targets, 1000, mx.random.key(0), noise_exponent=0.5)[1].mean(axis=1)
    # t = sqrt(u): mean 2/3 instead of 1/2, and the same draws replace a superset of positions.
    assert abs(uniform.mean().item() - 0.5) < 0.05 and abs(skewed.mean().item() - 2 / 3) < 0.05
    assert (skewed >= uniform).all().item()


def test_gradients_reach_encoder_scalars_and_router():
    model = tiny_model()
    make_trainable(model)
    prompts, targets = batch()
    grads = nn.value_and_grad(model, diffusion_loss)(model, prompts, targets, mx.random.key(0), True)[1]
    flat = dict(tree_flatten(grads))
    for name in ("model.encoder.language_model.layers.0.layer_scalar", "model.decoder.layers.0.router.proj.weight",
                 "model.decoder.layers.1.layer_scalar", "model.decoder.self_conditioning.gate_proj.weight"):
        assert mx.abs(flat[name]).sum().item() > 0, name


def test_encoded_cache_fills_the_same_cache_as_model_encode():
    model = tiny_model()
    prompts, _ = batch()
    ours, reference = encoded_cache(model, prompts), model.make_cache()
    model.encode(prompts, reference)
    for a, b in zip(ours, reference):
        assert a.offset == b.offset
        assert mx.allclose(a.keys, b.keys, atol=1e-5) and mx.allclose(a.values, b.values, atol=1e-5)


def mean_loss(model, prompts, targets) -> float:
    # The noise level is drawn per row: average over several draws.
    return sum(diffusion_loss(model, prompts, targets, mx.random.key(k)).item() for k in range(8)) / 8


@pytest.mark.parametrize("compile", [True, False])
def test_a_few_steps_reduce_the_loss(compile):
    model = tiny_model()
    prompts, targets = batch(B=8)
    before = mean_loss(model, prompts, targets)
    args = TrainingArgs(steps=20, learning_rate=5e-3, warmup_steps=5, compile=compile)
    losses = train(model, iter(lambda: (prompts, targets), None), args)
    assert len(losses) == 20
    assert mean_loss(model, prompts, targets) < 0.5 * before


def test_checkpoint_uses_released_names_and_loads_back(tmp_path):
    model = tiny_model()
    make_trainable(model)
    names = set(checkpoint_weights(model))
    assert "model.decoder.layers.0.experts.gate_up_proj" in names
    assert "model.decoder.layers.0.experts.down_proj" in names
    assert "model.encoder.language_model.layers.1.layer_scalar" in names
    save_checkpoint(model, tmp_path, CONFIG, {"max_denoising_steps": 7})
    loaded = load_model(tmp_path)
    assert loaded.args.generation_config["max_denoising_steps"] == 7
    ours, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(loaded.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]) for k in ours)
