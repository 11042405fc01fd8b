"""Sampler rules on hand-built logits of known entropy, and seeding."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma.sample import (
    accept_mask, free_mean, rows_stable, pad_after_eos, sample_categorical, sampler_step, softmax_entropy, temperature,
)


def two_way_logits(p: float, vocab: int = 4) -> list[float]:
    """Logits putting mass p on token 0 and 1-p on token 1 (others ~0)."""
    return [math.log(p), math.log(1 - p)] + [-1e9] * (vocab - 2)


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_entropy_matches_closed_form():
    logits = mx.array([two_way_logits(0.5), two_way_logits(0.9), [0.0] * 4])
    expected = [math.log(2), binary_entropy(0.9), math.log(4)]
    probs, h = softmax_entropy(logits)
    assert np.allclose(np.array(h), expected, atol=1e-6)
    assert np.allclose(np.array(probs)[1, :2], [0.9, 0.1], atol=1e-6)


def test_accepts_lowest_entropy_positions_while_sum_below_stays_within_bound():
    h = mx.array([[0.30, 0.01, 0.05, 0.02, 0.90]])
    # Sorted: 0.01, 0.02, 0.05, 0.30, 0.90; sums strictly below: 0, .01, .03, .08, .38.
    assert np.array(accept_mask(h, mx.array(0.1))).tolist() == [[True, True, True, True, False]]
    assert np.array(accept_mask(h, mx.array(0.02))).tolist() == [[False, True, False, True, False]]


def test_lowest_entropy_position_is_always_accepted():
    h = mx.array([[5.0, 3.0, 4.0]])
    assert np.array(accept_mask(h, mx.array(1e-6))).tolist() == [[False, True, False]]


def test_temperature_schedule_counts_down_linearly():
    assert temperature(48, 48, 0.4, 0.8) == pytest.approx(0.8)
    assert temperature(24, 48, 0.4, 0.8) == pytest.approx(0.6)
    assert temperature(1, 48, 0.4, 0.8) == pytest.approx(0.4 + 0.4 / 48)


def test_stability_needs_matching_history():
    a, b = mx.array([[1, 2, 3]]), mx.array([[1, 2, 4]])
    assert not rows_stable(a, [], 1).item()
    assert rows_stable(a, [b, a], 1).item()
    assert not rows_stable(a, [b, a], 2).item()
    assert rows_stable(a, [], 0).item()


def test_stability_is_per_row():
    a, b = mx.array([[1, 2, 3], [4, 5, 6]]), mx.array([[1, 2, 3], [4, 5, 7]])
    assert rows_stable(a, [b], 1).tolist() == [True, False]


def test_pad_after_first_eos():
    assert pad_after_eos([5, 1, 7, 106, 9], {1, 106}, 0) == ([5, 1, 0, 0, 0], True)
    assert pad_after_eos([5, 6], {1}, 0) == ([5, 6], False)


def step(logits, seed, inv_t=1.0, bound=0.1, pinned=None):
    keys = mx.random.split(mx.random.key(seed))
    logits = mx.array(logits)
    pinned = mx.zeros(logits.shape[:-1], dtype=mx.bool_) if pinned is None else mx.array(pinned)
    return sampler_step(logits, mx.array(inv_t), mx.array(bound), keys, pinned)


def test_sampler_step_keeps_confident_positions_and_renoises_the_rest():
    confident = [0.0, 40.0, 0.0, 0.0] + [0.0] * 60
    wide, narrow = [0.0] * 64, [0.0] * 32 + [-1e9] * 32
    logits = [[confident, wide, confident, narrow]]
    scaled, probs, argmax, canvas, accepted, h = step(logits, seed=3)
    # The narrow position is accepted (only ~0 entropy lies below it); the wide one is not.
    assert np.array(accepted).tolist() == [[True, False, True, True]]
    assert np.array(canvas)[0, [0, 2]].tolist() == [1, 1]
    assert 0 <= int(canvas[0, 3]) < 32
    assert np.array(argmax)[0].tolist()[0] == 1
    assert np.allclose(np.array(scaled), np.array(logits))


def test_temperature_scales_logits_before_entropy():
    logits = [[two_way_logits(0.7, 8)]]
    h_hot = step(logits, 0, inv_t=1.0)[-1]
    h_cold = step(logits, 0, inv_t=4.0)[-1]
    assert float(h_cold[0, 0]) < float(h_hot[0, 0])
    assert float(h_hot[0, 0]) == pytest.approx(binary_entropy(0.7), abs=1e-5)


def test_same_seed_same_samples_different_seed_differs():
    logits = [[[0.0] * 1000] * 32]
    a = np.array(step(logits, seed=1)[3])
    b = np.array(step(logits, seed=1)[3])
    c = np.array(step(logits, seed=2)[3])
    assert (a == b).all() and (a != c).any()


def test_categorical_draws_follow_the_distribution():
    probs = mx.broadcast_to(mx.array([0.1, 0.0, 0.6, 0.3]), (20000, 4))
    draws = np.array(sample_categorical(probs, mx.random.key(0)))
    assert np.allclose(np.bincount(draws, minlength=4) / 20000, [0.1, 0.0, 0.6, 0.3], atol=0.015)


def test_pinned_positions_spend_no_entropy_budget():
    confident = [0.0, 40.0, 0.0, 0.0] + [0.0] * 60
    wide, narrow = [0.0] * 64, [0.0] * 32 + [-1e9] * 32
    logits = [[confident, wide, confident, narrow]]
    # Unpinned, the narrow position's entropy (ln 32) lies below the wide one and exhausts the budget.
    assert np.array(step(logits, seed=3)[4]).tolist() == [[True, False, True, True]]
    accepted = step(logits, seed=3, pinned=[[False, False, False, True]])[4]
    assert np.array(accepted).tolist() == [[True, True, True, True]]


def test_mean_entropy_of_free_positions_only():
    h = mx.array([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
    pinned = mx.array([[False, False, True], [True, True, True]])
    assert free_mean(h, pinned).tolist() == [2.0, 0.0]
    assert free_mean(h, None).tolist() == pytest.approx([104 / 3, 2.0])
