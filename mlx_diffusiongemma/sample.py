"""The entropy-bounded denoising sampler as pure functions of logits and keys.

Matches transformers' `EntropyBoundSampler`, `LinearTemperatureScheduleLogitsProcessor` and
`StableAndConfidentStoppingCriteria`: `cur_step` counts down from `max_steps` to 1, every
position is resampled each step, and nothing is frozen between steps.
"""

import mlx.core as mx


def temperature(cur_step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule: t_max at the first step (cur_step == max_steps), falling toward t_min."""
    return t_min + (t_max - t_min) * cur_step / max_steps


@mx.compile
def accept_mask(token_entropy: mx.array, bound: mx.array) -> mx.array:
    """Accept positions in ascending entropy while the entropy strictly below each one sums
    to at most `bound` (the lowest-entropy position is always accepted)."""
    order = mx.argsort(token_entropy, axis=-1)
    sorted_h = mx.take_along_axis(token_entropy, order, axis=-1)
    accepted_sorted = (mx.cumsum(sorted_h, axis=-1) - sorted_h) <= bound
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(accepted_sorted, inverse, axis=-1)


def start_canvas(initial: tuple[int, ...] | None, shape: tuple[int, int], vocab_size: int,
                 key: mx.array) -> mx.array:
    """A canvas's first state: the given `initial` ids on every row, else uniform noise."""
    if initial is not None:
        return mx.broadcast_to(mx.array(initial, dtype=mx.int32), shape)
    return mx.random.randint(0, vocab_size, shape, dtype=mx.int32, key=key)


def renoise(canvas: mx.array, accepted: mx.array, vocab_size: int, key: mx.array) -> mx.array:
    """Keep accepted positions; every other position gets a fresh uniform random token."""
    noise = mx.random.randint(0, vocab_size, canvas.shape, dtype=canvas.dtype, key=key)
    return mx.where(accepted, canvas, noise)


@mx.compile
def softmax_entropy(scaled: mx.array) -> tuple[mx.array, mx.array]:
    """softmax(scaled) and its entropy in nats, from a single exp pass over the vocabulary
    (H = logsumexp(z) - sum(p * z)); exp is the costly op on CPU."""
    m = scaled.max(axis=-1, keepdims=True)
    e = mx.exp(scaled - m)
    total = e.sum(axis=-1, keepdims=True)
    probs = e / total
    token_entropy = (m + mx.log(total)).squeeze(-1) - (probs * scaled).sum(axis=-1)
    return probs, mx.maximum(token_entropy, 0.0)


def sample_categorical(probs: mx.array, key: mx.array) -> mx.array:
    """One draw per position from `probs` by inverting its CDF with one uniform number."""
    cdf = mx.cumsum(probs, axis=-1)
    u = mx.random.uniform(shape=(*probs.shape[:-1], 1), key=key) * cdf[..., -1:]
    return mx.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1).astype(mx.int32)


@mx.compile
def sampler_step(logits: mx.array, inv_t: mx.array, bound: mx.array, keys: mx.array, pinned: mx.array):
    """One step on raw logits (B, L, V): the temperature-scaled logits and their softmax,
    the argmax canvas, the next canvas (accepted samples, fresh noise elsewhere), the
    accepted mask and the per-position entropy of the scaled distribution.

    `pinned` (B, L) marks positions whose tokens are given: they spend none of the entropy
    budget (and so are always accepted)."""
    scaled = logits * inv_t
    probs, token_entropy = softmax_entropy(scaled)
    sampled = sample_categorical(probs, keys[0])
    accepted = accept_mask(mx.where(pinned, 0.0, token_entropy), bound)
    next_canvas = renoise(sampled, accepted, logits.shape[-1], keys[1])
    argmax = mx.argmax(scaled, axis=-1).astype(mx.int32)
    return scaled, probs, argmax, next_canvas, accepted, token_entropy


def free_mean(token_entropy: mx.array, pinned: mx.array | None) -> mx.array:
    """Per-row mean entropy over the positions that are not pinned (0 where all are)."""
    if pinned is None:
        return token_entropy.mean(axis=-1)
    free = ~pinned
    return mx.where(free, token_entropy, 0.0).sum(axis=-1) / mx.maximum(free.sum(axis=-1), 1)


def pin(canvas: mx.array, pins) -> mx.array:
    """`canvas` with the pinned positions of `pins` (a `CanvasPins` or None) set to their tokens."""
    return canvas if pins is None else mx.where(pins.mask, pins.tokens, canvas)


def rows_stable(argmax: mx.array, history: list[mx.array], stability_threshold: int) -> mx.array:
    """Per row (B,): the argmax canvas equals each of the last `stability_threshold` ones."""
    B = argmax.shape[0]
    if stability_threshold == 0:
        return mx.ones((B,), dtype=mx.bool_)
    if len(history) < stability_threshold:
        return mx.zeros((B,), dtype=mx.bool_)
    return mx.stack([(argmax == h).all(axis=-1) for h in history[-stability_threshold:]]).all(axis=0)


def pad_after_eos(tokens: list[int], eos_ids: set[int], pad_id: int) -> tuple[list[int], bool]:
    """Replace every token after the first EOS by `pad_id`; report whether an EOS was found."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1] + [pad_id] * (len(tokens) - i - 1), True
    return list(tokens), False


# --- The fused step used by `generate_step` (see steps.py) ---

@mx.compile
def capped_sampler_step(raw: mx.array, cap: mx.array, bias: mx.array, inv_t: mx.array, bound: mx.array,
                        keys: mx.array, pinned: mx.array):
    """`sampler_step` on the head's logits before the softcap: `cap * tanh(raw / cap) + bias`
    is fused into the pass that scales them, so the capped logits are never written out.
    The same arithmetic in the same order as softcapping first (same tokens, same seed)."""
    capped = mx.tanh(raw.astype(mx.float32) / cap) * cap
    return sampler_step(capped + bias, inv_t, bound, keys, pinned)


@mx.compile
def reveal_confident(probs: mx.array, sampled: mx.array, revealed: mx.array, threshold: mx.array,
                     force_all: mx.array) -> mx.array:
    """The confidence-threshold rule (mlx-vlm's default sampler) on the probabilities of the
    `sampled` tokens: see `reveal_by_confidence`."""
    confidence = mx.take_along_axis(probs, sampled[..., None], axis=-1).squeeze(-1)
    return reveal_by_confidence(confidence, revealed, threshold, force_all)


@mx.compile
def reveal_by_confidence(confidence: mx.array, revealed: mx.array, threshold: mx.array,
                         force_all: mx.array) -> mx.array:
    """The positions not yet revealed whose sampled token has probability (`confidence`,
    (B, L)) >= `threshold`, at least the most confident one per row while any is left,
    every one left when `force_all`."""
    free = ~revealed
    new = free & (confidence >= threshold)
    starved = free.any(axis=-1) & ~new.any(axis=-1)
    best = mx.argmax(mx.where(free, confidence, -1.0), axis=-1)
    forced = starved[:, None] & (mx.arange(confidence.shape[1])[None] == best[:, None])
    return new | forced | (free & force_all)
