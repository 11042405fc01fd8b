"""Block-autoregressive diffusion generation, layered like mlx-lm:
`generate_step` (token ids) -> `stream_generate` (text and statistics) -> `generate`.
"""

import math
import secrets
import time
from dataclasses import dataclass, field, fields, replace
from typing import Generator, Sequence

import mlx.core as mx

from .cache import cache_length
from .errors import UserError
from .sample import is_stable, pad_after_eos, sampler_step, temperature

REFERENCE_DEFAULTS = dict(
    max_tokens=256, max_denoising_steps=48, t_min=0.4, t_max=0.8, entropy_bound=0.1,
    stability_threshold=1, confidence_threshold=0.005,
)


@dataclass(frozen=True)
class GenerationSettings:
    """Sampler settings; `resolve` fills them from the model's generation_config.json."""

    max_tokens: int = REFERENCE_DEFAULTS["max_tokens"]
    max_denoising_steps: int = REFERENCE_DEFAULTS["max_denoising_steps"]
    t_min: float = REFERENCE_DEFAULTS["t_min"]
    t_max: float = REFERENCE_DEFAULTS["t_max"]
    entropy_bound: float = REFERENCE_DEFAULTS["entropy_bound"]
    stability_threshold: int = REFERENCE_DEFAULTS["stability_threshold"]
    confidence_threshold: float = REFERENCE_DEFAULTS["confidence_threshold"]
    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    initial_canvas: tuple[int, ...] | None = None

    @classmethod
    def resolve(cls, model, **overrides) -> "GenerationSettings":
        """Reference defaults < the model's generation_config.json < explicit settings."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown generation setting {sorted(unknown)[0]!r}; see GenerationSettings")
        settings = cls(**_from_generation_config(model.args.generation_config, model.args.eos_token_ids))
        explicit = {k: v for k, v in overrides.items() if v is not None}
        for key in ("eos_token_ids", "initial_canvas"):
            if explicit.get(key) is not None:
                explicit[key] = tuple(int(t) for t in explicit[key])
        return replace(settings, **explicit)

    def validate(self, vocab_size: int, canvas_length: int) -> None:
        """Raise a one-line UserError for any setting out of range."""
        _check(self.max_tokens > 0, f"max_tokens must be > 0, got {self.max_tokens}")
        _check(self.max_denoising_steps > 0, f"max_denoising_steps must be > 0, got {self.max_denoising_steps}")
        _check(self.t_min >= 0 and self.t_max >= 0, f"temperatures must be >= 0, got t_min={self.t_min}, t_max={self.t_max}")
        _check(self.t_max > self.t_min, f"t_max must be greater than t_min, got t_max={self.t_max} <= t_min={self.t_min}")
        _check(self.t_min > 0, f"t_min must be > 0 (the last step divides by it), got {self.t_min}")
        _check(self.entropy_bound > 0, f"entropy_bound must be > 0, got {self.entropy_bound}")
        _check(self.stability_threshold >= 0, f"stability_threshold must be >= 0, got {self.stability_threshold}")
        _check(self.confidence_threshold > 0, f"confidence_threshold must be > 0, got {self.confidence_threshold}")
        if self.initial_canvas is not None:
            _check(len(self.initial_canvas) == canvas_length,
                   f"initial_canvas has {len(self.initial_canvas)} tokens, the model's canvas_length is {canvas_length}")
            check_token_ids(self.initial_canvas, vocab_size, "initial_canvas")
        check_token_ids(self.eos_token_ids, vocab_size, "eos_token_ids")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"invalid setting: {message}")


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    """Every id must index the model's vocabulary."""
    bad = [t for t in ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise UserError(f"{what} contains token id {bad[0]}, outside the model's vocabulary [0, {vocab_size})")


def _from_generation_config(gen: dict, config_eos: list[int]) -> dict:
    sampler = gen.get("sampler_config") or {}
    eos = gen.get("eos_token_id")
    eos = config_eos if eos is None else ([eos] if isinstance(eos, int) else eos)
    values = {
        "max_tokens": gen.get("max_new_tokens"),
        "max_denoising_steps": gen.get("max_denoising_steps"),
        "t_min": gen.get("t_min"),
        "t_max": gen.get("t_max"),
        "entropy_bound": sampler.get("entropy_bound") if isinstance(sampler, dict) else None,
        "stability_threshold": gen.get("stability_threshold"),
        "confidence_threshold": gen.get("confidence_threshold"),
    }
    # A null in generation_config.json means "the reference default", as in transformers.
    out = {k: (REFERENCE_DEFAULTS[k] if v is None else v) for k, v in values.items()}
    out["eos_token_ids"] = tuple(int(e) for e in eos)
    return out


@dataclass
class StepEvent:
    """One denoising step, or (when `committed` is set) one committed canvas."""

    canvas: int
    step: int
    argmax: mx.array
    accepted: int
    mean_entropy: float
    committed: list[int] | None = None
    finish_reason: str | None = None
    prompt_seconds: float | None = None


def generate_step(
    model, prompt_ids: Sequence[int], cache: list | None = None, **settings
) -> Generator[StepEvent, None, None]:
    """Encode `prompt_ids` (appending to `cache`, a fresh one by default) and denoise
    canvases until an EOS is committed or `max_tokens` are written.

    Yields a `StepEvent` per denoising step (`committed` is None) and one per committed
    canvas (`committed` holds its ids, pad after the first EOS). Batch size 1.
    """
    s = GenerationSettings.resolve(model, **settings)
    args = model.args
    s.validate(args.vocab_size, args.canvas_length)
    prompt = _prompt_array(prompt_ids, args.vocab_size)
    cache = model.make_cache() if cache is None else cache
    n_canvases = math.ceil(s.max_tokens / args.canvas_length)
    _check_context(cache_length(cache) + prompt.shape[1], n_canvases, args)
    key = mx.random.key(secrets.randbits(63) if s.seed is None else s.seed)
    tic = time.perf_counter()
    model.encode(prompt, cache)
    prompt_seconds = time.perf_counter() - tic
    eos = set(s.eos_token_ids)
    for c in range(n_canvases):
        key, canvas_key = mx.random.split(key)
        last = None
        for last in _denoise_canvas(model, cache, s, c, canvas_key):
            last.prompt_seconds, prompt_seconds = prompt_seconds, None
            yield last
        tokens, found_eos = pad_after_eos(last.argmax.tolist(), eos, args.pad_token_id)
        finish = "stop" if found_eos else ("length" if c == n_canvases - 1 else None)
        yield StepEvent(c, last.step, last.argmax, last.accepted, last.mean_entropy, tokens, finish)
        if finish:
            return
        model.encode(last.argmax[None], cache)


def _prompt_array(prompt_ids: Sequence[int], vocab_size: int) -> mx.array:
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise UserError("the prompt is empty; give some text or token ids")
    check_token_ids(ids, vocab_size, "the prompt")
    return mx.array(ids, dtype=mx.int32)[None]


def _check_context(used: int, n_canvases: int, args) -> None:
    # Whole canvases are committed, so the budget counts every canvas in full.
    need = used + n_canvases * args.canvas_length
    if need > args.max_position_embeddings:
        raise UserError(
            f"prompt ({used} tokens) + {n_canvases} canvases x {args.canvas_length} = {need} tokens exceeds "
            f"the model's context of {args.max_position_embeddings}; shorten the prompt or lower max_tokens"
        )


def _denoise_canvas(model, cache: list, s: GenerationSettings, index: int, key: mx.array):
    """Yield a StepEvent per step of one canvas until the stable-and-confident stop."""
    args = model.args
    noise_key, key = mx.random.split(key)
    if s.initial_canvas is not None:
        canvas = mx.array(s.initial_canvas, dtype=mx.int32)[None]
    else:
        canvas = mx.random.randint(0, args.vocab_size, (1, args.canvas_length), dtype=mx.int32, key=noise_key)
    bound = mx.array(s.entropy_bound, dtype=mx.float32)
    scaled, probs, history = None, None, []
    for n, cur_step in enumerate(range(s.max_denoising_steps, 0, -1), start=1):
        key, step_key = mx.random.split(key)
        logits = model.denoise(canvas, cache, scaled, self_conditioning_probs=probs)
        inv_t = mx.array(1.0 / temperature(cur_step, s.max_denoising_steps, s.t_min, s.t_max), dtype=mx.float32)
        scaled, probs, argmax, canvas, accepted, entropy = sampler_step(logits, inv_t, bound, mx.random.split(step_key))
        mean_entropy = entropy.mean()
        mx.eval(argmax, canvas, mean_entropy, accepted)
        stop = mean_entropy.item() < s.confidence_threshold and is_stable(argmax, history, s.stability_threshold)
        history = (history + [argmax])[-max(s.stability_threshold, 1):]
        yield StepEvent(index, n, argmax[0], int(accepted.sum().item()), mean_entropy.item())
        if stop:
            return


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


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt given as text (encoded as-is, BOS added once) or as ids."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
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
                    **settings) -> Generator[GenerationResponse, None, None]:
    """Generate text, yielding a `GenerationResponse` per denoising step and per committed canvas."""
    ids = encode_prompt(tokenizer, prompt)
    s = GenerationSettings.resolve(model, **settings)
    tracker = CommittedText(tokenizer, set(s.eos_token_ids), model.args.pad_token_id)
    mx.reset_peak_memory()
    prompt_tps, steps, forwards, generated = 0.0, [], 0, 0
    tic = time.perf_counter()
    for ev in generate_step(model, ids, cache=cache, **settings):
        if ev.prompt_seconds is not None:
            prompt_tps = len(ids) / max(ev.prompt_seconds, 1e-9)
            tic = time.perf_counter()
        text = ""
        if ev.committed is None:
            forwards += 1
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
    """Generate and return the full committed text."""
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
