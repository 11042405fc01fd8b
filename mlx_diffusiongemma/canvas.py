"""What the two denoising loops of a canvas share (`steps.denoise_canvas`, and
`generate._denoise_canvas` for sharded models): the step event they yield, a canvas's
pinned positions, how a canvas starts, and the EOS bias that keeps a canvas from ending
before a pinned token."""

import math
from dataclasses import dataclass

import mlx.core as mx

from .sample import renoise, start_canvas


@dataclass
class StepEvent:
    """One denoising step, or (when `committed` is set) one committed canvas.

    For a single prompt `argmax` is (canvas,), `accepted` an int, `mean_entropy` a float
    and `committed` a list of ids; for a batch each is per row ((B, canvas) and lists).
    On a committed canvas `step` is the step at which the row stopped (per row in a batch).
    """

    canvas: int
    step: int | list[int]
    argmax: mx.array
    accepted: int | list[int]
    mean_entropy: float | list[float]
    committed: list[int] | list[list[int]] | None = None
    finish_reason: str | None | list[str | None] = None
    prompt_seconds: float | None = None


@dataclass
class CanvasPins:
    """The pinned positions of one canvas: `mask` (B, L) bool, `tokens` (B, L) int32, and
    `no_eos` (B, L) bool, the free positions that lie before a later pinned one."""

    mask: mx.array
    tokens: mx.array
    no_eos: mx.array
    all_pinned: bool


def canvas_lengths(max_tokens: int, canvas_length: int, full_canvas: bool = True,
                   min_canvas_length: int = 1) -> list[int]:
    """Positions of each canvas a generation of `max_tokens` writes: whole canvases, as the
    reference, or without `full_canvas` a final canvas cut to the tokens that remain (at
    least `min_canvas_length`, mlx-vlm's rule)."""
    n = math.ceil(max_tokens / canvas_length)
    remaining = max_tokens - (n - 1) * canvas_length
    last = canvas_length if full_canvas else min(canvas_length, max(remaining, min_canvas_length))
    return [canvas_length] * (n - 1) + [last]


def context_needed(args, prompt_tokens: int, output_tokens: int, full_canvas: bool = True,
                   min_canvas_length: int = 1) -> int:
    """Context positions a prompt and an output of these lengths take: the output counts in
    the canvases it is written in (`canvas_lengths`)."""
    return prompt_tokens + sum(canvas_lengths(output_tokens, args.canvas_length, full_canvas, min_canvas_length))


_BANNED_LOGIT = -1e9


def eos_bias(eos_token_ids, vocab_size: int, pins: CanvasPins | None) -> mx.array | None:
    """A logit far below any other on EOS ids at free positions before a later pinned one
    (see `GenerationSettings.pinned`), or None when nothing needs it."""
    if pins is None or not eos_token_ids:
        return None
    is_eos = mx.zeros((vocab_size,), dtype=mx.bool_)
    is_eos[mx.array(list(eos_token_ids))] = True
    banned = pins.no_eos[..., None] & is_eos
    # Finite, not -inf: the entropy sums p * logit, and 0 * -inf would be NaN there (which
    # breaks acceptance and the stop test); exp of this underflows to exactly 0 all the same.
    return mx.where(banned, _BANNED_LOGIT, 0.0).astype(mx.float32)


def open_canvas(model, s, key: mx.array, pins: CanvasPins | None, shape: tuple[int, int]):
    """What a canvas of `shape` (B, L) starts from: the key chain's next key, the first
    canvas (uniform noise, or the first L tokens of `s`'s initial one), the (B, L) pinned
    mask and the EOS bias (or None)."""
    (B, L), V = shape, model.args.vocab_size
    key, noise_key = mx.random.split(key)
    initial = None if s.initial_canvas is None else s.initial_canvas[:L]
    canvas = start_canvas(initial, (B, L), V, noise_key)
    pinned = mx.zeros((B, L), dtype=mx.bool_) if pins is None else pins.mask
    return key, canvas, pinned, eos_bias(s.eos_token_ids, V, pins)


def sampler_start(s, pins: CanvasPins | None, pinned: mx.array):
    """The step's entropy budget and confidence threshold as arrays, and the confidence
    sampler's revealed mask and held tokens before a canvas's first step (the pins)."""
    # The confidence rule accepts by probability, so the entropy budget admits every draw.
    bound = mx.array(math.inf if s.sampler == "confidence" else s.entropy_bound, dtype=mx.float32)
    held = mx.zeros(pinned.shape, dtype=mx.int32) if pins is None else pins.tokens
    return bound, mx.array(s.threshold, dtype=mx.float32), pinned, held


def hold_revealed(accepted: mx.array, draws: mx.array, argmax: mx.array, revealed: mx.array, held: mx.array,
                  vocab_size: int, key: mx.array):
    """The confidence sampler's bookkeeping after a step: the newly `accepted` draws are
    held, every position not yet revealed is renoised, and the draft shows what is held.
    Returns (held, revealed, next canvas, draft argmax)."""
    held, revealed = mx.where(accepted, draws, held), revealed | accepted
    return held, revealed, renoise(held, revealed, vocab_size, key), mx.where(revealed, held, argmax)


def fully_pinned_event(index: int, pins: CanvasPins | None, B: int, prompt_seconds: float | None):
    """The one event of a canvas whose every position is pinned (committed without a
    forward), or None when some position is free."""
    if pins is None or not pins.all_pinned:
        return None
    L = pins.mask.shape[1]
    return StepEvent(index, 0, pins.tokens, [L] * B, [0.0] * B, prompt_seconds=prompt_seconds)
