"""Block-autoregressive diffusion generation, layered like mlx-lm:
`generate_step` (token ids) -> `stream_generate` (text and statistics) -> `generate`.

Settings are resolved once into a `GenerationSettings` (reference defaults < the model's
generation_config.json < explicit values) and validated before any work. `generate_step`
runs a batch of equal-length prompts; pinned positions (`GenerationSettings.pinned`) hold
given tokens in every denoising step's output, the hook infill and edits build on.
"""

import math
import numbers
import re
import secrets
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Generator, Mapping, Sequence

import mlx.core as mx

from .canvas import (
    CanvasPins, StepEvent, canvas_lengths, context_needed, fully_pinned_event, hold_revealed, open_canvas,
    sampler_start,
)
from .errors import UserError
from .models.cache import cache_length
from .models.sharding import broadcast
from .sample import (
    free_mean, pad_after_eos, pin, reveal_by_confidence, reveal_confident, rows_stable, sampler_step, temperature,
)
from .sharded_sample import sharded_sampler_step
from .steps import denoise_canvas

REFERENCE_DEFAULTS = dict(
    max_tokens=256, max_denoising_steps=48, t_min=0.4, t_max=0.8, entropy_bound=0.1,
    stability_threshold=1, confidence_threshold=0.005,
)
_INTEGER_SETTINGS = ("max_tokens", "max_denoising_steps", "stability_threshold")
_FLOAT_SETTINGS = ("t_min", "t_max", "entropy_bound", "confidence_threshold")
_SEED_RANGE = 2**64
SAMPLERS = ("entropy", "confidence")
# `fast=True`: the preset chosen on the Sudoku evaluation (benchmarks/README.md, "Fast
# mode"): the step count capped (the temperature schedule is compressed to it). Each part
# is also a setting of its own and explicit values win; the cap never raises a model's own.
FAST_PRESET = dict(max_denoising_steps=14)
# generation_config.json's names for the settings it sets under another name.
_FILE_NAMES = {"max_tokens": "max_new_tokens", "entropy_bound": "sampler_config.entropy_bound"}


@dataclass(frozen=True)
class GenerationSettings:
    """Sampler settings; `resolve` fills them from the model's generation_config.json.

    `pinned` maps output positions (0 = the first generated token, counted across canvases)
    to token ids that those positions hold in every step's output: always accepted, left
    out of the entropy budget and of the stop test, never renoised, committed as given. A
    canvas's first forward still reads the canvas as it starts (noise, or `initial_canvas`)
    and the pins enter it with the first renoising: that forward has no self-conditioning
    yet, and on a canvas whose only clean positions were the pins it set some free
    positions on a wrong course that self-conditioning then kept (the Sudoku model with
    its givens pinned solved 98.2% of 500 tuning puzzles at 30 blanks that way, 99.4% with
    the pins entering after the first forward; benchmarks/README.md). A free position
    before the last pinned one never holds an EOS (its EOS logits are masked), so
    generation cannot end before every pinned token is written. For a batch, `pinned` may
    instead be a list with one mapping per row.
    `seed` is any integer in [0, 2**64).

    Beyond the reference: `sampler="confidence"` reveals and holds a position once its
    sampled token has probability >= `threshold` (mlx-vlm's default rule) instead of the
    entropy budget; `self_conditioning_top_k` builds self-conditioning from each position's
    k most probable tokens (0: the whole vocabulary, as the reference); `full_canvas=False`
    cuts the final canvas to the tokens that remain of `max_tokens` (at least
    `min_canvas_length`, at most the model's canvas: mlx-vlm's rule, its
    `diffusion_full_canvas` and `diffusion_min_canvas_length`) and commits exactly
    `max_tokens`, where the reference writes and commits whole canvases (an
    `initial_canvas` then seeds the cut canvas with its first tokens); `fast=True` sets
    `FAST_PRESET` (at most 14 steps) under whatever is given explicitly.
    """

    max_tokens: int = REFERENCE_DEFAULTS["max_tokens"]
    max_denoising_steps: int = REFERENCE_DEFAULTS["max_denoising_steps"]
    t_min: float = REFERENCE_DEFAULTS["t_min"]
    t_max: float = REFERENCE_DEFAULTS["t_max"]
    entropy_bound: float = REFERENCE_DEFAULTS["entropy_bound"]
    stability_threshold: int = REFERENCE_DEFAULTS["stability_threshold"]
    confidence_threshold: float = REFERENCE_DEFAULTS["confidence_threshold"]
    sampler: str = "entropy"
    threshold: float = 0.9
    self_conditioning_top_k: int = 0
    full_canvas: bool = True
    min_canvas_length: int = 64
    fast: bool = False
    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    initial_canvas: tuple[int, ...] | None = None
    pinned: tuple = ()

    @classmethod
    def resolve(cls, model, **overrides) -> "GenerationSettings":
        """Reference defaults < the model's generation_config.json < explicit settings
        (None means "not given"). Validated against the model."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown generation setting {sorted(unknown)[0]!r}; see GenerationSettings")
        explicit = {k for k, v in overrides.items() if v is not None}
        from_file = _from_generation_config(model.args.generation_config, model.args.eos_token_ids, explicit)
        settings = cls(**from_file).updated(**overrides)
        try:
            settings.validate(model.args.vocab_size, model.args.canvas_length)
        except _SettingError as e:
            raise _blame(e, _file_fields(model.args.generation_config) - explicit, explicit) from None
        return settings

    def updated(self, **overrides) -> "GenerationSettings":
        """A copy with the given (not None) settings replaced, sequences normalised."""
        explicit = {k: _plain_number(k, v) for k, v in overrides.items() if v is not None}
        for key in ("eos_token_ids", "initial_canvas"):
            if key in explicit:
                explicit[key] = _token_tuple(explicit[key], key)
        if "pinned" in explicit:
            explicit["pinned"] = _pinned_tuple(explicit["pinned"])
        if explicit.get("fast"):
            preset = dict(FAST_PRESET, max_denoising_steps=min(self.max_denoising_steps,
                                                               FAST_PRESET["max_denoising_steps"]))
            explicit = {**preset, **explicit}
        return replace(self, **explicit)

    def validate(self, vocab_size: int, canvas_length: int) -> None:
        """Raise a one-line UserError for any setting of the wrong type or out of range."""
        for name in _INTEGER_SETTINGS:
            _check(_is_int(getattr(self, name)), f"{name} must be an integer, got {getattr(self, name)!r}", name)
        for name in _FLOAT_SETTINGS:
            value = getattr(self, name)
            _check(_is_number(value) and math.isfinite(value), f"{name} must be a finite number, got {value!r}", name)
        _check(self.max_tokens > 0, f"max_tokens must be > 0, got {self.max_tokens}", "max_tokens")
        _check(self.max_denoising_steps > 0, f"max_denoising_steps must be > 0, got {self.max_denoising_steps}",
               "max_denoising_steps")
        _check(self.t_min >= 0, f"temperatures must be >= 0, got t_min={self.t_min}", "t_min")
        _check(self.t_max >= 0, f"temperatures must be >= 0, got t_max={self.t_max}", "t_max")
        _check(self.t_max > self.t_min, f"t_max must be greater than t_min, got t_max={self.t_max} <= t_min={self.t_min}",
               "t_max", "t_min")
        _check(self.t_min > 0, f"t_min must be > 0 (the last step divides by it), got {self.t_min}", "t_min")
        _check(self.entropy_bound > 0, f"entropy_bound must be > 0, got {self.entropy_bound}", "entropy_bound")
        _check(self.stability_threshold >= 0, f"stability_threshold must be >= 0, got {self.stability_threshold}",
               "stability_threshold")
        _check(self.confidence_threshold > 0, f"confidence_threshold must be > 0, got {self.confidence_threshold}",
               "confidence_threshold")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < _SEED_RANGE),
               f"seed must be an integer in [0, 2**64), got {self.seed!r}; pick one from 0 to {_SEED_RANGE - 1}",
               "seed")
        if self.initial_canvas is not None:
            _check(len(self.initial_canvas) == canvas_length,
                   f"initial_canvas has {len(self.initial_canvas)} tokens, the model's canvas_length is {canvas_length}")
            check_token_ids(self.initial_canvas, vocab_size, "initial_canvas")
        check_token_ids(self.eos_token_ids, vocab_size, "eos_token_ids")
        _check_speed_settings(self, vocab_size)
        for row in _pinned_per_row(self.pinned):
            check_token_ids([t for _, t in row], vocab_size, "pinned")
            if row and row[-1][0] >= self.max_tokens:
                raise UserError(
                    f"invalid setting: pinned position {row[-1][0]} is beyond max_tokens={self.max_tokens}; "
                    "raise max_tokens or pin earlier positions"
                )


def _check_speed_settings(s: GenerationSettings, vocab_size: int) -> None:
    _check(isinstance(s.fast, bool), f"fast must be True or False, got {s.fast!r}")
    _check(s.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {s.sampler!r}")
    _check(_is_number(s.threshold) and 0 < s.threshold <= 1, f"threshold must be in (0, 1], got {s.threshold!r}")
    k = s.self_conditioning_top_k
    _check(_is_int(k) and 0 <= k <= vocab_size,
           f"self_conditioning_top_k must be an integer in [0, {vocab_size}] (0: whole vocabulary), got {k!r}")
    _check(isinstance(s.full_canvas, bool), f"full_canvas must be True or False, got {s.full_canvas!r}")
    m = s.min_canvas_length
    _check(_is_int(m) and m >= 1, f"min_canvas_length must be an integer >= 1, got {m!r}")


def _is_int(value) -> bool:
    # numbers.Integral takes numpy's integers too; a bool is never a count or an id.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain_number(name: str, value):
    """numpy scalars as Python numbers, so settings compare and print as users expect."""
    if name in (*_INTEGER_SETTINGS, "seed") and _is_int(value):
        return int(value)
    if name in _FLOAT_SETTINGS and _is_number(value):
        return float(value)
    return value


class _SettingError(UserError):
    """A setting out of range; `fields` names the settings the check involved."""

    def __init__(self, message: str, fields: tuple[str, ...]):
        super().__init__(message)
        self.fields = fields


def _check(ok: bool, message: str, *fields: str) -> None:
    if not ok:
        raise _SettingError(f"invalid setting: {message}", fields)


def _file_fields(gen: dict) -> set[str]:
    """The settings whose value came from generation_config.json (not a null there)."""
    sampler = gen.get("sampler_config") if isinstance(gen.get("sampler_config"), dict) else {}
    names = {"max_tokens": gen.get("max_new_tokens"), "entropy_bound": sampler.get("entropy_bound")}
    names.update({k: gen.get(k) for k in ("max_denoising_steps", "t_min", "t_max", "stability_threshold",
                                           "confidence_threshold")})
    return {k for k, v in names.items() if v is not None}


def _blame(e: _SettingError, from_file: set[str], explicit: set[str]) -> UserError:
    """Name generation_config.json when it set a value the failed check involved, so a bad
    file does not read like a bad option."""
    involved = set(e.fields)
    from_file = from_file & involved
    if not from_file:
        return e
    message = str(e).removeprefix("invalid setting: ")
    if not involved & explicit:
        for ours, theirs in _FILE_NAMES.items():
            message = re.sub(rf"\b{ours}\b", theirs, message)
        return UserError(f"generation_config.json: {message}; fix or delete generation_config.json")
    given = ", ".join(sorted(_FILE_NAMES.get(f, f) for f in from_file))
    return UserError(f"invalid setting: {message} ({given} from the model's generation_config.json)")


def _token_tuple(ids, what: str) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise UserError(f"invalid setting: {what} must be a list of token ids, got {type(ids).__name__}")
    bad = [t for t in ids if not _is_int(t)]
    if bad:
        raise UserError(f"invalid setting: {what} must hold integer token ids, found {bad[0]!r}")
    return tuple(int(t) for t in ids)


def _pinned_tuple(pinned) -> tuple:
    """Sorted (position, id) pairs, or one such tuple per row for a list of mappings."""
    if _is_row_list(pinned):
        return tuple(_pinned_pairs(row) for row in pinned)
    return _pinned_pairs(pinned)


def _is_row_list(pinned) -> bool:
    # One mapping (or list of pairs) per row; a flat list of pairs pins every row alike.
    if isinstance(pinned, (Mapping, str, bytes)) or not isinstance(pinned, Sequence):
        return False
    return any(isinstance(row, Mapping) or (isinstance(row, Sequence) and len(row) != 2)
               or (isinstance(row, Sequence) and not all(_is_int(x) for x in row)) for row in pinned)


def _pinned_per_row(pinned: tuple) -> list[tuple]:
    """`pinned` as a list of per-row pair tuples (one entry when every row shares it)."""
    return list(pinned) if pinned and (not pinned[0] or not _is_int(pinned[0][0])) else [pinned]


def _pinned_pairs(pinned) -> tuple[tuple[int, int], ...]:
    if isinstance(pinned, Mapping):
        pinned = list(pinned.items())
    try:
        pairs = [(p, t) for p, t in pinned]
    except (TypeError, ValueError):
        raise UserError("invalid setting: pinned must map output positions to token ids") from None
    for p, t in pairs:
        if not (_is_int(p) and _is_int(t)) or p < 0:
            raise UserError(f"invalid setting: pinned needs integer positions >= 0 and token ids, found {p!r}: {t!r}")
    if len({p for p, _ in pairs}) != len(pairs):
        raise UserError("invalid setting: pinned names a position twice")
    return tuple(sorted(pairs))


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    """Every id must be an integer indexing the model's vocabulary."""
    for t in ids:
        if not _is_int(t):
            raise UserError(f"{what} must be integer token ids, found {t!r}")
        if not 0 <= t < vocab_size:
            raise UserError(f"{what} contains token id {t}, outside the model's vocabulary [0, {vocab_size})")


def _from_generation_config(gen: dict, eos: list[int], replaced: set[str] = frozenset()) -> dict:
    """The file's settings (nulls as reference defaults); values that an explicit setting
    `replaced` are not checked, as they are never used."""
    sampler = gen.get("sampler_config")
    if sampler is not None and not isinstance(sampler, dict):
        raise UserError(
            f"generation_config.json: 'sampler_config' must be an object or null, found {sampler!r}; "
            "fix or delete generation_config.json"
        )
    sampler = sampler or {}
    values = {
        "max_tokens": gen.get("max_new_tokens"),
        "max_denoising_steps": gen.get("max_denoising_steps"),
        "t_min": gen.get("t_min"),
        "t_max": gen.get("t_max"),
        "entropy_bound": sampler.get("entropy_bound"),
        "stability_threshold": gen.get("stability_threshold"),
        "confidence_threshold": gen.get("confidence_threshold"),
    }
    for key, value in values.items():
        wanted = _is_int if key in _INTEGER_SETTINGS else _is_number
        if value is not None and key not in replaced and not (wanted(value) and math.isfinite(value)):
            name = {"max_tokens": "max_new_tokens", "entropy_bound": "sampler_config.entropy_bound"}.get(key, key)
            raise UserError(
                f"generation_config.json: '{name}' must be a finite {'integer' if wanted is _is_int else 'number'}, "
                f"found {value!r}; fix or delete generation_config.json"
            )
    # A null in generation_config.json means "the reference default", as in transformers.
    out = {k: (REFERENCE_DEFAULTS[k] if v is None else v) for k, v in values.items()}
    out["eos_token_ids"] = tuple(eos)
    return out


def seed_key(seed: int | None) -> mx.array:
    """The root PRNG key of a generation (a fresh random one when `seed` is None)."""
    return mx.random.key(secrets.randbits(63) if seed is None else seed)


def generate_step(
    model, prompt_ids: Sequence[int] | Sequence[Sequence[int]], cache: list | None = None,
    settings: GenerationSettings | None = None, images: Sequence | None = None, **overrides,
) -> Generator[StepEvent, None, None]:
    """Encode `prompt_ids` (appending to `cache`, a fresh one by default) and denoise
    canvases until an EOS is committed or `max_tokens` are written.

    Yields a `StepEvent` per denoising step (`committed` is None) and one per committed
    canvas (`committed` holds its ids, pad after the first EOS). `settings` is a resolved
    `GenerationSettings` (else `overrides` are resolved against the model). A list of
    equal-length prompts runs as a batch: rows share one PRNG key, each row stops its
    canvas on its own stop test, and events carry per-row values.

    `images` are the `PreparedImage`s (see `images.py`) of the prompt's runs of image
    tokens, in order: `prompt_ids` holds each already expanded (`expand_image_tokens`).
    """
    s = settings.updated(**overrides) if settings is not None else GenerationSettings.resolve(model, **overrides)
    if settings is not None:
        # Settings built by hand never went through `resolve`; checking is cheap.
        s.validate(model.args.vocab_size, model.args.canvas_length)
    prompt, batched = _prompt_array(prompt_ids, model.args.vocab_size)
    # The tower runs before any encoding, so a bad image leaves the cache untouched.
    features = model.embed_images(images) if images else None
    for event in _generate(model, prompt, model.make_cache() if cache is None else cache, s, features):
        yield event if batched else _unbatched(event)


def _generate(model, prompt: mx.array, cache: list, s: GenerationSettings, features: list | None = None):
    args = model.args
    B, L = prompt.shape[0], args.canvas_length
    _check_context(cache_length(cache) + prompt.shape[1], s, args)
    key = seed_key(s.seed)
    shard = getattr(model, "vocab_shard", None)
    if shard is not None:
        # Without a seed each rank draws its own; all must follow one key chain.
        key = broadcast(key, shard.group)
    tic = time.perf_counter()
    if features:
        model.encode(prompt, cache, features)
    else:
        model.encode(prompt, cache)
    prompt_seconds = time.perf_counter() - tic
    eos, ended = set(s.eos_token_ids), [False] * B
    sizes = canvas_lengths(s.max_tokens, L, s.full_canvas, s.min_canvas_length)
    for c, size in enumerate(sizes):
        pins = canvas_pins(s, c, B, L, size)
        # One key chain runs through every canvas and step of the generation.
        key, last, steps = yield from _canvas_loop(model, s)(model, cache, s, c, key, pins, (B, size),
                                                             prompt_seconds)
        prompt_seconds = None
        # Whole canvases are committed as the reference does; a cut final canvas commits
        # exactly what remains of max_tokens.
        keep = size if s.full_canvas else min(size, s.max_tokens - c * L)
        committed, finish = [], []
        for row, done in zip(last.argmax[:, :keep].tolist(), ended):
            tokens, found = pad_after_eos(row, eos, args.pad_token_id)
            committed.append([args.pad_token_id] * keep if done else tokens)
            finish.append("stop" if done or found else ("length" if c == len(sizes) - 1 else None))
        ended = [f == "stop" for f in finish]
        yield StepEvent(c, steps, last.argmax, last.accepted, last.mean_entropy, committed, finish)
        if all(f is not None for f in finish):
            return
        model.encode(last.argmax, cache)


def _canvas_loop(model, s: GenerationSettings):
    """The fused loop (steps.py); a vocabulary-sharded model keeps the reference loop below,
    which takes the same levers."""
    shard = getattr(model, "vocab_shard", None)
    if shard is None:
        return denoise_canvas
    if s.self_conditioning_top_k > shard.smallest:
        raise UserError(f"self_conditioning_top_k={s.self_conditioning_top_k} is more than the "
                        f"{shard.smallest} tokens of the smallest rank's vocabulary slice; lower it")
    return _denoise_canvas


def _unbatched(e: StepEvent) -> StepEvent:
    finish = e.finish_reason[0] if e.committed is not None else None
    committed = e.committed[0] if e.committed is not None else None
    step = e.step[0] if e.committed is not None else e.step
    return StepEvent(e.canvas, step, e.argmax[0], e.accepted[0], e.mean_entropy[0], committed, finish,
                     e.prompt_seconds)


def _prompt_array(prompt_ids, vocab_size: int) -> tuple[mx.array, bool]:
    prompt_ids = _listed(prompt_ids)
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise UserError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
    batched = len(prompt_ids) > 0 and not _is_int(prompt_ids[0]) and isinstance(prompt_ids[0], Sequence)
    rows = list(prompt_ids) if batched else [prompt_ids]
    for row in rows:
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not row:
            raise UserError("the prompt is empty; give some text or token ids")
        check_token_ids(row, vocab_size, "the prompt")
    if len({len(r) for r in rows}) > 1:
        raise UserError("a batch of prompts must have equal lengths; pad or group them by length")
    return mx.array([list(r) for r in rows], dtype=mx.int32), batched


def _listed(ids):
    """numpy and MLX arrays of token ids as lists (what a tokenizer may hand back)."""
    if not isinstance(ids, (str, bytes, Sequence)) and callable(getattr(ids, "tolist", None)):
        return ids.tolist()
    return ids


def _check_context(used: int, s: GenerationSettings, args) -> None:
    need = context_needed(args, used, s.max_tokens, s.full_canvas, s.min_canvas_length)
    if need > args.max_position_embeddings:
        n_canvases = math.ceil(s.max_tokens / args.canvas_length)
        raise UserError(
            f"prompt ({used} tokens) + {n_canvases} canvases ({need - used} positions) = {need} tokens exceeds "
            f"the model's context of {args.max_position_embeddings}; shorten the prompt or lower max_tokens"
        )


def canvas_pins(s: GenerationSettings, index: int, B: int, L: int, size: int) -> CanvasPins | None:
    """The `pinned` settings that fall on canvas `index` (of `size` positions, after
    `index` canvases of L), or None."""
    rows = _pinned_per_row(s.pinned)
    if len(rows) == 1:
        rows = rows * B
    elif len(rows) != B:
        raise UserError(f"invalid setting: pinned has {len(rows)} rows for a batch of {B} prompts")
    start = index * L
    if all(not row or row[-1][0] < start for row in rows):
        return None
    masks, tokens, no_eos = [], [], []
    for row in rows:
        mask, ids = [False] * size, [0] * size
        for p, t in row:
            if start <= p < start + size:
                mask[p - start], ids[p - start] = True, t
        last = row[-1][0] if row else -1
        masks.append(mask)
        tokens.append(ids)
        no_eos.append([not m and start + i < last for i, m in enumerate(mask)])
    return CanvasPins(mx.array(masks), mx.array(tokens, dtype=mx.int32), mx.array(no_eos), all(map(all, masks)))


def _denoise_canvas(model, cache: list, s: GenerationSettings, index: int, key: mx.array,
                    pins: CanvasPins | None, shape: tuple[int, int], prompt_seconds: float | None):
    """Yield a StepEvent per step of one canvas of `shape` (B, L) until every row met its
    stop test; the last event's `argmax` holds each row's canvas as it stood when that row
    stopped. Returns the key chain's next key, the last event and the step at which each
    row stopped."""
    B = shape[0]
    key, canvas, pinned, bias = open_canvas(model, s, key, pins, shape)
    if (event := fully_pinned_event(index, pins, B, prompt_seconds)) is not None:
        yield event
        return key, event, [0] * B
    shard = getattr(model, "vocab_shard", None)
    # Sharded, the logits are this rank's vocabulary slice (see sharded_sample.py).
    sampler = sampler_step if shard is None else partial(sharded_sampler_step, vocab=shard)
    bias = bias if bias is None or shard is None else shard.local(bias)
    confident = s.sampler == "confidence"
    bound, threshold, revealed, held = sampler_start(s, pins, pinned)
    scaled, probs, history = None, None, []
    final, done, steps = None, mx.zeros((B,), dtype=mx.bool_), [0] * B
    for n, cur_step in enumerate(range(s.max_denoising_steps, 0, -1), start=1):
        key, step_key = mx.random.split(key)
        logits = model.denoise(canvas, cache, scaled, self_conditioning_probs=probs,
                               self_conditioning_top_k=s.self_conditioning_top_k or None)
        if bias is not None:
            logits = logits + bias
        inv_t = mx.array(1.0 / temperature(cur_step, s.max_denoising_steps, s.t_min, s.t_max), dtype=mx.float32)
        keys = mx.random.split(step_key)
        scaled, probs, argmax, canvas, accepted, entropy = sampler(logits, inv_t, bound, keys, pinned)
        if confident:
            last = mx.array(cur_step == 1)
            accepted = (reveal_confident(probs, canvas, revealed, threshold, last) if shard is None
                        else reveal_by_confidence(shard.values_at(probs, canvas), revealed, threshold, last))
            held, revealed, canvas, argmax = hold_revealed(accepted, canvas, argmax, revealed, held,
                                                           model.args.vocab_size, keys[1])
        canvas, argmax = pin(canvas, pins), pin(argmax, pins)
        mean_entropy = free_mean(entropy, None if pins is None else pins.mask)
        stop = (mean_entropy < s.confidence_threshold) & rows_stable(argmax, history, s.stability_threshold)
        if confident:
            stop = stop | revealed.all(axis=-1)
        # A row keeps the canvas it stopped on; the rows still running carry on.
        final = argmax if final is None else mx.where(done[:, None], final, argmax)
        done = done | stop
        history = (history + [argmax])[-max(s.stability_threshold, 1):]
        mx.eval(final, done, canvas, mean_entropy, accepted, revealed, held)
        event = StepEvent(index, n, final, accepted.sum(axis=-1).tolist(), mean_entropy.tolist(),
                          prompt_seconds=prompt_seconds)
        prompt_seconds = None
        yield event
        steps = [m or (n if d else 0) for m, d in zip(steps, done.tolist())]
        if all(steps):
            break
    return key, event, [m or n for m in steps]


@dataclass
class GenerationResponse:
    """What `stream_generate` yields after each denoising step and each committed canvas."""

    text: str
    draft: str
    canvas: int
    step: int
    accepted: int
    mean_entropy: float
    committed: list[int] | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    steps: list[int] = field(default_factory=list)
    decoder_forwards: int = 0
    peak_memory: float = 0.0
    finish_reason: str | None = None

    @property
    def steps_per_canvas(self) -> float:
        return sum(self.steps) / len(self.steps) if self.steps else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.generation_tokens / self.decoder_forwards if self.decoder_forwards else 0.0


def encode_text(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt given as text (encoded as-is, BOS added once) or as ids."""
    if prompt is None:
        raise UserError("the prompt is missing; give some text or token ids")
    prompt = _listed(prompt)
    if not isinstance(prompt, str):
        if isinstance(prompt, bytes) or not isinstance(prompt, Sequence):
            raise UserError(f"the prompt must be text or a list of token ids, got {type(prompt).__name__}")
        return list(_token_tuple(prompt, "the prompt"))
    if not prompt.strip():
        raise UserError("the prompt is empty or only whitespace; give some text")
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bos is None or not prompt.startswith(bos)
    return tokenizer.encode(prompt, add_special_tokens=add_special)


class CommittedText:
    """Committed text as deltas; a trailing U+FFFD (a character split across canvases) is
    held back until the next canvas completes it."""

    def __init__(self, tokenizer, eos: set[int], pad: int):
        self.tokenizer, self.eos, self.pad = tokenizer, eos, pad
        self.tokens: list[int] = []
        self.emitted = ""

    def visible(self, tokens: list[int]) -> list[int]:
        out = []
        for t in tokens:
            if t in self.eos:
                break
            out.append(t)
        return out

    def commit(self, tokens: list[int], final: bool) -> str:
        self.tokens += self.visible(tokens)
        text = self.tokenizer.decode(self.tokens)
        if not final:
            text = text.rstrip("\ufffd")
        # Decoding more tokens only appends for byte-fallback BPE; should a tokenizer ever
        # rewrite earlier text, keep streaming rather than stall (what was shown stays).
        delta = text[len(self.emitted):]
        self.emitted = self.emitted + delta
        return delta

    def draft(self, argmax: mx.array) -> str:
        return self.tokenizer.decode(self.visible(argmax.tolist()))


def stream_generate(model, tokenizer, prompt: str | Sequence[int], cache: list | None = None,
                    settings: GenerationSettings | None = None, images: Sequence | None = None,
                    **overrides) -> Generator[GenerationResponse, None, None]:
    """Generate text, yielding a `GenerationResponse` per denoising step and per committed canvas.

    `images` (paths, PIL images, uint8 arrays or `PreparedImage`s) fill the prompt's image
    placeholders (the tokenizer's `<|image|>`, one per image, in order), each widened to
    the image's soft tokens.
    """
    ids = encode_text(tokenizer, prompt)
    prepared = None
    if images is not None:
        from .images import expand_for, prepare_for

        prepared = prepare_for(model, images)
        ids = expand_for(model, ids, prepared)
    s = settings.updated(**overrides) if settings is not None else GenerationSettings.resolve(model, **overrides)
    tracker = CommittedText(tokenizer, set(s.eos_token_ids), model.args.pad_token_id)
    mx.reset_peak_memory()
    prompt_tps, steps, forwards, generated = 0.0, [], 0, 0
    tic = time.perf_counter()
    for ev in generate_step(model, ids, cache=cache, settings=s, images=prepared):
        if ev.prompt_seconds is not None:
            prompt_tps = len(ids) / max(ev.prompt_seconds, 1e-9)
            tic = time.perf_counter()
        text = ""
        if ev.committed is None:
            # Step 0 is a fully pinned canvas, committed without a decoder forward.
            forwards += ev.step > 0
        else:
            steps.append(ev.step)
            generated += sum(t != model.args.pad_token_id for t in ev.committed)
            text = tracker.commit(ev.committed, final=ev.finish_reason is not None)
        elapsed = max(time.perf_counter() - tic, 1e-9)
        yield GenerationResponse(
            text=text, draft=tracker.draft(ev.argmax), canvas=ev.canvas, step=ev.step,
            accepted=ev.accepted, mean_entropy=ev.mean_entropy, committed=ev.committed,
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=generated,
            generation_tps=generated / elapsed, steps=list(steps), decoder_forwards=forwards,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=ev.finish_reason,
        )


def generate(model, tokenizer, prompt: str | Sequence[int], verbose: bool = False, **settings) -> str:
    """Generate and return the full committed text (`settings` as for `stream_generate`,
    `images` included)."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **settings):
        text += last.text
        if verbose and last.text:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\n{format_stats(last)}")
    return text


def format_stats(r: GenerationResponse) -> str:
    """One line of generation statistics."""
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"{r.steps_per_canvas:.1f} steps/canvas, {r.tokens_per_forward:.2f} tokens/forward | "
        f"peak memory {r.peak_memory:.2f} GB | finish: {r.finish_reason}"
    )
