"""What the bidirectional canvas decoder makes possible: filling holes in a text, rewriting
a span in place, and scoring every token of an existing text in one pass.

- `infill` / `stream_infill`: the text before the first hole is the prompt (encoded into
  the cache); the text between and after the holes is pinned (`GenerationSettings.pinned`)
  at its output positions, followed by a pinned end token, so the model writes only the
  holes while seeing what comes after them. A hole has the length the caller gives, or
  the model chooses among candidate lengths the one whose result it scores best.
- `plan_fill`: the same layout for one hole between a prefix and a suffix, for callers
  that run the generation themselves (the server's fill-in-the-middle completions).
- `edit`: `text[start:end]` regenerated in place (optionally following an instruction).
- `check`: one bidirectional decoder forward per canvas-length block (the text before the
  block in the encoder cache), giving each token's surprise -log p.

Raw text (BOS + text) and chat-templated use (a user turn, the text as the model's reply)
are both supported.
"""

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import mlx.core as mx

from .canvas import context_needed
from .errors import UserError
from .generate import GenerationSettings, encode_text, generate_step

DEFAULT_HOLE = ("<fill>", "</fill>")
# Lengths (tokens) tried for a hole of unknown length: a wrong span length is known to
# hurt diffusion infill badly, so the model picks among several.
CANDIDATE_LENGTHS = (2, 4, 8, 16, 32, 64)
GAP = "___"
DEFAULT_INSTRUCTION = f"Reply with this text, each gap marked {GAP} filled in:"


@dataclass
class InfillResult:
    """A filled text: `text` is the prompt part, the pinned segments (byte for byte as
    given) and the model's `fills`; `lengths` are the hole lengths in tokens; `score` is
    the mean surprise (nats) of the output tokens under one decoder pass (lower fits
    better); `tried` maps every candidate length tuple to its score."""

    text: str
    fills: list[str]
    lengths: tuple[int, ...]
    score: float
    tokens: list[int]
    tried: dict[tuple[int, ...], float] = field(default_factory=dict)


@dataclass
class InfillDraft:
    """One denoising step of one candidate: `pieces` is the output so far as
    `(text, pinned)` pairs in order (pinned text is as given, the rest is the model's)."""

    lengths: tuple[int, ...]
    canvas: int
    step: int
    accepted: int
    mean_entropy: float
    pieces: list[tuple[str, bool]]


def split_holes(text: str, hole: Sequence[str] = DEFAULT_HOLE) -> tuple[list[str], list[int | None]]:
    """The text around the holes (one more segment than holes) and each hole's length as
    written between its markers (an integer, or None when empty)."""
    opening, closing = _markers(hole)
    segments, lengths, rest = [], [], text
    while True:
        i, j = rest.find(opening), rest.find(closing)
        if i < 0:
            if j >= 0:
                raise UserError(f"unbalanced hole markers: {closing!r} without an opening {opening!r}")
            segments.append(rest)
            break
        if 0 <= j < i:
            raise UserError(f"unbalanced hole markers: {closing!r} before its opening {opening!r}")
        if j < 0:
            raise UserError(f"unbalanced hole markers: {opening!r} is never closed by {closing!r}")
        inside = rest[i + len(opening) : j]
        if opening in inside:
            raise UserError(f"unbalanced hole markers: {opening!r} inside another hole")
        segments.append(rest[:i])
        lengths.append(_hole_length(inside, opening, closing))
        rest = rest[j + len(closing) :]
    if not lengths:
        raise UserError(f"the text has no hole; mark each gap as {opening}{closing} (or {opening}N{closing} for N tokens)")
    return segments, lengths


def _markers(hole: Sequence[str]) -> tuple[str, str]:
    if isinstance(hole, str) or len(hole) != 2 or not all(isinstance(m, str) and m for m in hole) or hole[0] == hole[1]:
        raise UserError(f"hole markers must be two different non-empty strings (opening, closing), got {hole!r}")
    return hole[0], hole[1]


def _hole_length(inside: str, opening: str, closing: str) -> int | None:
    inside = inside.strip()
    if not inside:
        return None
    if not inside.isdigit() or int(inside) <= 0:
        raise UserError(f"{opening}{inside}{closing}: a hole holds nothing or a token count > 0")
    return int(inside)


class _Layout:
    """The prompt ids and the tokens of the pinned segments for a text with holes."""

    def __init__(self, model, tokenizer, segments: list[str], instruction: str | None):
        self.model, self.tokenizer, self.segments = model, tokenizer, segments
        self.chat = instruction is not None
        head = _encode(tokenizer, segments[0])
        if self.chat:
            self.prompt = chat_prompt(tokenizer, instruction) + head
        else:
            self.prompt = _bos(tokenizer) + head
        if not self.prompt:
            raise UserError("the text before the first hole is empty and the tokenizer has no BOS token; "
                            "start the text with some words")
        self.pinned_ids = [_encode(tokenizer, s) for s in segments[1:]]
        self.end = end_token(tokenizer, model, self.chat)

    def output_length(self, lengths: Sequence[int]) -> int:
        """Output tokens for these hole lengths, the end token included."""
        return sum(lengths) + sum(len(ids) for ids in self.pinned_ids) + 1

    def plan(self, lengths: Sequence[int]) -> tuple[dict[int, int], list[tuple[int, int]]]:
        """Pinned output positions and the (start, end) output span of each hole."""
        pinned, spans, p = {}, [], 0
        for n, ids in zip(lengths, self.pinned_ids):
            spans.append((p, p + n))
            p += n
            for t in ids:
                pinned[p] = t
                p += 1
        pinned[p] = self.end
        return pinned, spans

    def needed(self, lengths: Sequence[int]) -> int:
        """Context positions these hole lengths take, in whole canvases after the prompt."""
        return context_needed(self.model.args, len(self.prompt), self.output_length(lengths))

    def fits(self, lengths: Sequence[int]) -> bool:
        return self.needed(lengths) <= self.model.args.max_position_embeddings

    def check_context(self, lengths: Sequence[int]) -> None:
        args = self.model.args
        need = self.needed(lengths)
        if need > args.max_position_embeddings:
            raise UserError(
                f"the prompt ({len(self.prompt)} tokens) and the rest of the text with holes of "
                f"{', '.join(map(str, lengths))} tokens need {need} positions in whole canvases, more than the "
                f"model's context of {args.max_position_embeddings}; shorten the holes or the text"
            )

    def pieces(self, tokens: Sequence[int], spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
        """The output as `(text, pinned)` pairs: each fill decoded, each segment as given."""
        out = []
        for (a, b), segment in zip(spans, self.segments[1:]):
            out.append((self.tokenizer.decode(_visible(tokens[a:b], self.model)), False))
            out.append((segment, True))
        return out


def _visible(tokens: Sequence[int], model) -> list[int]:
    # EOS and pad ids in a draft are not text (the pinned end token follows the last hole).
    return [t for t in tokens if t not in model.args.eos_token_ids and t != model.args.pad_token_id]


def chat_prompt(tokenizer, user: str) -> list[int]:
    """Token ids of a one-turn chat asking `user`, ending with the model's generation
    prompt (thinking off)."""
    if not user.strip():
        raise UserError("the instruction is empty; give some text or leave it out")
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                 tokenize=False, enable_thinking=False)
    except Exception as e:  # jinja2 and tokenizer errors alike: the template cannot render it
        raise UserError(f"the model's chat template cannot render this message ({' '.join(str(e).split())[:200]})") from None
    return encode_text(tokenizer, rendered)


def end_token(tokenizer, model, chat: bool) -> int:
    """The id that ends the output: the end of the model's turn in a chat, else EOS."""
    eos = list(model.args.eos_token_ids)
    if chat:
        # Gemma 4's chat template closes every model turn with <turn|>.
        turn_end = tokenizer.convert_tokens_to_ids("<turn|>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(turn_end, int) and turn_end != getattr(tokenizer, "unk_token_id", None):
            return turn_end
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None and not eos:
        raise UserError("the model has no EOS token to end the text with; add eos_token_id to its config")
    return eos_id if eos_id is not None else eos[0]


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [bos]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _resolve_lengths(lengths, written: list[int | None]) -> list[int | None]:
    if lengths is None:
        return list(written)
    if isinstance(lengths, int) and not isinstance(lengths, bool):
        lengths = [lengths] * len(written)
    lengths = list(lengths)
    if len(lengths) != len(written):
        raise UserError(f"{len(lengths)} hole lengths given for {len(written)} holes")
    for n in lengths:
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise UserError(f"a hole length must be a whole number of tokens > 0, got {n!r}")
    return [n if n is not None else w for n, w in zip(lengths, written)]


def stream_infill(model, tokenizer, text: str, hole: Sequence[str] = DEFAULT_HOLE, lengths=None,
                  instruction: str | None = None, chat: bool = False,
                  candidates: Sequence[int] = CANDIDATE_LENGTHS,
                  **settings) -> Iterator[InfillDraft | InfillResult]:
    """`infill`, yielding an `InfillDraft` per denoising step of every candidate tried and
    the chosen `InfillResult` last."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("the text is empty; give a text with holes")
    segments, written = split_holes(text, hole)
    if chat and instruction is None:
        instruction = f"{DEFAULT_INSTRUCTION}\n\n{GAP.join(segments)}"
    layout = _Layout(model, tokenizer, segments, instruction)
    return _search(layout, _resolve_lengths(lengths, written), candidates, settings)


def infill(model, tokenizer, text: str, hole: Sequence[str] = DEFAULT_HOLE, lengths=None,
           instruction: str | None = None, chat: bool = False,
           candidates: Sequence[int] = CANDIDATE_LENGTHS, **settings) -> InfillResult:
    """Fill each hole of `text`, marked `<fill></fill>` (or `<fill>N</fill>` for N tokens;
    `hole` names other markers).

    The text before the first hole is the prompt; the text between and after the holes is
    pinned at its positions and returned byte for byte. `lengths` (an int for every hole,
    or one entry per hole, None for "model's choice") overrides the lengths in the markers.
    A hole without a length is tried at each of `candidates` (one hole after the other,
    the others held at their best so far) and the result the model scores best is kept.

    Raw text by default; with `instruction` (or `chat=True`, which asks to fill the gaps)
    the text is the model's reply to that user turn in the chat template. `settings` are
    `GenerationSettings` overrides (not `max_tokens` or `pinned`, which infill sets).
    """
    result = None
    for result in stream_infill(model, tokenizer, text, hole, lengths, instruction, chat, candidates, **settings):
        pass
    return result


def edit(model, tokenizer, text: str, start: int, end: int, instruction: str | None = None,
         length: int | None = None, hole: Sequence[str] = DEFAULT_HOLE, **settings) -> InfillResult:
    """Regenerate `text[start:end]` in place; the rest of the text is kept byte for byte.

    Raw text: the model rewrites the span from both sides' context. With `instruction`
    the model is asked, in a chat turn showing the whole text with the span marked, to
    apply it to that span. The new span has `length` tokens, or the length among a few
    around the old span's that the model scores best.
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError("the text is empty; give a text to edit")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(text)):
        raise UserError(f"the span to edit must satisfy 0 <= start <= end <= {len(text)}, got {start!r}..{end!r}")
    opening, closing = _markers(hole)
    old = text[start:end]
    user = None
    if instruction is not None:
        user = (f"{instruction}\n\nApply this to the part between {opening} and {closing} of the text below, "
                f"and reply with the whole text:\n\n{text[:start]}{opening}{old}{closing}{text[end:]}")
    n = max(1, len(_encode(tokenizer, old)))
    around = sorted({max(1, round(n * f)) for f in (0.5, 1.0, 1.5, 2.0)})
    layout = _Layout(model, tokenizer, [text[:start], text[end:]], user)
    result = None
    for result in _search(layout, _resolve_lengths(length, [None]), around, settings):
        pass
    return result


@dataclass
class FillPlan:
    """One hole of `hole` tokens between a prefix and a suffix, laid out as `infill` lays
    out `prefix<fill>N</fill>suffix` (raw text): `prompt` is BOS + the prefix, `pinned`
    holds the `suffix` ids from output position `hole` on and the end token after them,
    and `output_length` counts every output position, the end token included."""

    prompt: list[int]
    pinned: dict[int, int]
    hole: int
    suffix: list[int]
    output_length: int


def plan_fill(model, tokenizer, prefix: str, suffix: str, length: int) -> FillPlan:
    """The layout for `length` tokens written between `prefix` and `suffix`; generate with
    `max_tokens=plan.output_length, pinned=plan.pinned` after `plan.prompt`. The context
    is not checked here (generation checks it; a server names the field first)."""
    (length,) = _resolve_lengths(length, [None])
    if length is None:
        raise UserError("a fill needs a hole length in tokens")
    layout = _Layout(model, tokenizer, [prefix, suffix], None)
    pinned, _ = layout.plan((length,))
    return FillPlan(layout.prompt, pinned, length, layout.pinned_ids[0], layout.output_length((length,)))


def _search(layout: _Layout, lengths: list[int | None], candidates: Sequence[int], settings: dict):
    """Coordinate search over the unknown hole lengths; yields drafts, then the best result."""
    for key in ("max_tokens", "pinned"):
        if settings.get(key) is not None:
            raise UserError(f"infill sets {key} itself; leave it out")
    candidates = sorted({int(c) for c in candidates})
    if not candidates or candidates[0] <= 0:
        raise UserError(f"candidate lengths must be whole numbers > 0, got {candidates!r}")
    unknown = [i for i, n in enumerate(lengths) if n is None]
    # Start from the middle candidate, or the longest one that fits the context below it.
    fitting = [c for c in candidates[: len(candidates) // 2 + 1]
               if layout.fits(tuple(c if n is None else n for n in lengths))] or candidates[:1]
    best_lengths = tuple(fitting[-1] if n is None else n for n in lengths)
    layout.check_context(best_lengths)
    tried: dict[tuple[int, ...], InfillResult] = {}
    for i in unknown or [None]:
        options = [best_lengths] if i is None else [best_lengths[:i] + (c,) + best_lengths[i + 1 :] for c in candidates]
        # A candidate too long for the context is skipped; best_lengths always fits.
        options = [o for o in options if layout.fits(o)]
        for option in options:
            if option not in tried:
                tried[option] = yield from _attempt(layout, option, settings)
        best_lengths = min(options, key=lambda o: tried[o].score)
    best = tried[best_lengths]
    best.tried = {k: r.score for k, r in tried.items()}
    yield best


def _attempt(layout: _Layout, lengths: tuple[int, ...], settings: dict):
    """One generation with these hole lengths; yields its drafts, returns its result."""
    model = layout.model
    pinned, spans = layout.plan(lengths)
    total = layout.output_length(lengths)
    s = GenerationSettings.resolve(model, max_tokens=total, pinned=pinned, **settings)
    committed: list[int] = []
    for ev in generate_step(model, layout.prompt, settings=s):
        if ev.committed is not None:
            committed += ev.committed
            continue
        draft = committed + ev.argmax.tolist()
        yield InfillDraft(lengths, ev.canvas, ev.step, ev.accepted, ev.mean_entropy, layout.pieces(draft, spans))
    tokens = committed[:total] + [model.args.pad_token_id] * max(0, total - len(committed))
    fills = [layout.tokenizer.decode(tokens[a:b]) for a, b in spans]
    text = layout.segments[0] + "".join(f + s for f, s in zip(fills, layout.segments[1:]))
    score = sum(surprises(model, layout.prompt, tokens)) / len(tokens)
    return InfillResult(text, fills, lengths, score, tokens[: total - 1])


def log_probs_of(model, logits: mx.array, ids: mx.array) -> mx.array:
    """log softmax(logits) at `ids`; a vocabulary-sharded model's logits are its rank's
    slice, and every rank gets the whole vocabulary's answer."""
    shard = getattr(model, "vocab_shard", None)
    if shard is not None:
        return shard.log_probs_of(logits, ids)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]


def surprises(model, prefix: Sequence[int], tokens: Sequence[int]) -> list[float]:
    """-log p (nats) of each of `tokens` after `prefix`: one bidirectional decoder forward
    per canvas-length block, the prefix and the earlier blocks in the encoder cache, the
    last block padded to a whole canvas with pad tokens (as a committed canvas is after
    its EOS), self-conditioning off (a canvas's first step)."""
    args = model.args
    L = args.canvas_length
    cache = model.make_cache()
    if prefix:
        model.encode(mx.array([list(prefix)], dtype=mx.int32), cache)
    out: list[float] = []
    for start in range(0, len(tokens), L):
        block = list(tokens[start : start + L])
        canvas = mx.array([block + [args.pad_token_id] * (L - len(block))], dtype=mx.int32)
        logits = model.denoise(canvas, cache)[0, : len(block)]
        out += (-log_probs_of(model, logits, mx.array(block, dtype=mx.int32))).tolist()
        if start + L < len(tokens):
            model.encode(canvas, cache)
    return out


@dataclass
class TokenScore:
    """One token of a checked text: its id, its characters `text[start:end]` (tokens that
    share a character, byte pieces of one character, share its span) and its surprise."""

    index: int
    token: int
    start: int
    end: int
    piece: str
    surprise: float

    @property
    def probability(self) -> float:
        return math.exp(-self.surprise)


@dataclass
class CheckResult:
    """Per-token surprise of a text; `unlikeliest(n)` lists the n most surprising tokens."""

    text: str
    tokens: list[TokenScore]

    def unlikeliest(self, n: int = 10) -> list[TokenScore]:
        return sorted(self.tokens, key=lambda t: -t.surprise)[:n]

    @property
    def mean_surprise(self) -> float:
        return sum(t.surprise for t in self.tokens) / len(self.tokens) if self.tokens else 0.0


def check(model, tokenizer, text: str, prompt: str | None = None, chat: bool = False) -> CheckResult:
    """Each token's surprise -log p given the text on both sides, from one bidirectional
    decoder forward per canvas-length block (the text before the block in the encoder
    cache, the block as the canvas). An end token follows the text, as in a finished reply.

    Raw text: BOS, then `prompt` (context, not scored), then `text`. With `chat` the text
    is scored as the model's reply to `prompt`, a user turn in the chat template.
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError("the text is empty; give some text to check")
    if chat:
        if prompt is None:
            raise UserError("a chat check needs the user turn the text replies to (prompt)")
        prefix = chat_prompt(tokenizer, prompt)
    else:
        prefix = _bos(tokenizer) + (_encode(tokenizer, prompt) if prompt else [])
    ids, spans = token_spans(tokenizer, text)
    tokens = ids + [end_token(tokenizer, model, chat)]
    args = model.args
    need = context_needed(args, len(prefix), len(tokens))
    if need > args.max_position_embeddings:
        raise UserError(f"the text ({len(ids)} tokens after a {len(prefix)}-token prefix) needs {need} positions, "
                        f"more than the model's context of {args.max_position_embeddings}; check a shorter text")
    scores = surprises(model, prefix, tokens)[: len(ids)]
    return CheckResult(text, [TokenScore(i, t, a, b, text[a:b], s)
                              for i, (t, (a, b), s) in enumerate(zip(ids, spans, scores))])


def token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of `text` (no special tokens) and each one's character span."""
    ids = _encode(tokenizer, text)
    backend = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        enc = backend(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return ids, [tuple(span) for span in enc["offset_mapping"]]
    except (TypeError, KeyError, NotImplementedError, ValueError):
        pass
    # No offsets (a slow tokenizer): spans from decoding growing prefixes.
    spans, before = [], 0
    for i in range(len(ids)):
        after = len(tokenizer.decode(ids[: i + 1]).rstrip("\ufffd"))
        spans.append((before, max(before, after)))
        before = max(before, after)
    return ids, spans
