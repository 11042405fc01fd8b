"""Multi-turn conversations that reuse the encoder cache between turns.

Every turn renders the whole conversation with the tokenizer's chat template, steps
the cache back to the longest prefix it shares with what the cache holds, and encodes
only the rest. The cache usually has to step back a little: the last committed canvas
is never encoded, and the template writes earlier answers without their thoughts and
without the empty thought block of the generation prompt.
"""

from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, replace

import jinja2

from .errors import UserError, first_line
from .generate import GenerationResponse, GenerationSettings, stream_generate
from .prompt_cache import PromptCache

# Slack for the tokens after the common prefix that belong to the previous prompt
# (the generation prompt's empty thought block), on top of the reply's canvases.
_PROMPT_TAIL_SLACK = 64


def repair_text(text: str) -> str:
    """Replace bytes that were not UTF-8 (lone surrogates from argv or stdin) by U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        # Surrogates that do not stand for a byte (e.g. pasted from a broken JSON string).
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def check_chat_template(tokenizer, required: bool = True) -> None:
    """Refuse a tokenizer whose chat template is missing (when `required`: messages cannot
    become a prompt without one, raw text prompts can) or cannot render a conversation."""
    has = getattr(tokenizer, "has_chat_template", None)
    if has is None:
        has = getattr(tokenizer, "chat_template", None) is not None
    if has:
        _render_probe(tokenizer)
    elif required:
        raise UserError(
            f"{_model_dir(tokenizer)} has no chat template, which prompts built from messages need: "
            "add the model's chat_template.jinja to it (or a \"chat_template\" entry in tokenizer_config.json); "
            "raw prompts work without one through the Python API (generate with text)"
        )


def _render_probe(tokenizer) -> None:
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
        raise UserError(
            f"the chat template of {_model_dir(tokenizer)} cannot render a conversation ({first_line(e)}); "
            "fix or re-download its chat_template.jinja"
        ) from None


def _model_dir(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or "the model directory"


def _stop_strings(stop) -> list[str]:
    # One string is one stop string, not a list of characters.
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise UserError(f"invalid setting: stop strings must be non-empty text, found {s!r}")
    return [repair_text(s) for s in stops]


class StopStrings:
    """Cuts streamed text at the first stop string.

    A tail that could be the start of a stop string is held back until the next delta
    shows whether it is one, so nothing after a stop string is ever emitted.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """Return the text that may be shown now and whether a stop string was found."""
        text = self.held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = 0 if final else self._partial_tail(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def cut(self, text: str) -> str:
        """`text` up to its first stop string (for drafts, which are not streamed)."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(hits)] if hits else text

    def _partial_tail(self, text: str) -> int:
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


@dataclass
class TurnStats:
    """How a turn's prompt was encoded."""

    prompt_tokens: int
    reused_tokens: int

    @property
    def encoded_tokens(self) -> int:
        """Tokens the encoder ran on for this turn's prompt."""
        return self.prompt_tokens - self.reused_tokens


class ChatSession:
    """A conversation with a model: history, system prompt, thinking mode and an
    encoder cache that later turns reuse.

    `settings` are `GenerationSettings` fields (`max_tokens`, `max_denoising_steps`,
    `t_min`, `t_max`, `entropy_bound`, `seed`, ...). `stop` strings end a reply early.
    `keep` is how many positions sliding-attention layers store; the default lets a
    turn step back over a whole reply, so only the new tokens are encoded.
    """

    def __init__(self, model, tokenizer, system: str | None = None, thinking: bool = False,
                 stop: Sequence[str] = (), keep: int | None = None, **settings):
        self.model, self.tokenizer = model, tokenizer
        self.settings = GenerationSettings.resolve(model, **settings)
        self.system = repair_text(system) if system else None
        self.thinking = thinking
        self.stop = _stop_strings(stop)
        # Checked once here, so a conversation without a template fails at the start
        # rather than on every turn.
        check_chat_template(tokenizer)
        self.prompt_cache = PromptCache(model, self._default_keep() if keep is None else keep)
        self.messages: list[dict] = []
        self.last: GenerationResponse | None = None
        self.last_turn: TurnStats | None = None

    def _default_keep(self) -> int:
        args = self.model.args
        canvases = -(-self.settings.max_tokens // args.canvas_length)
        return args.sliding_window - 1 + canvases * args.canvas_length + _PROMPT_TAIL_SLACK

    def reset(self) -> None:
        """Forget the conversation (the system prompt and thinking mode stay)."""
        self.messages = []
        self.last = self.last_turn = None
        self.prompt_cache.clear()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` rendered by the tokenizer's chat template, ending with
        the generation prompt for the current thinking mode."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        try:
            ids = self.tokenizer.apply_chat_template(
                system + messages, add_generation_prompt=True, enable_thinking=self.thinking,
                tokenize=True, return_dict=False,
            )
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
            raise UserError(
                f"the chat template of {_model_dir(self.tokenizer)} cannot render this conversation "
                f"({first_line(e)}); fix or re-download its chat_template.jinja"
            ) from None
        return [int(t) for t in (ids["input_ids"] if isinstance(ids, dict) else ids)]

    def reply(self, text: str) -> Iterator[GenerationResponse]:
        """Add a user message and stream the answer as `GenerationResponse`s whose `text`
        is the committed delta (cut at stop strings).

        Closing the iterator early (Ctrl-C) keeps the turn with the text committed so
        far, and leaves the cache holding exactly what `cached_ids` says.
        """
        text = repair_text(text)
        if not text.strip():
            raise UserError("the message is empty; type some text")
        return self._turn({"role": "user", "content": text})

    def _turn(self, user: dict) -> Iterator[GenerationResponse]:
        ids = self.prompt_ids(self.messages + [user])
        start = self.prompt_cache.reuse(ids)
        self.last_turn = TurnStats(len(ids), start)
        turn = _Turn(ids, start, StopStrings(self.stop))
        try:
            yield from self._stream(turn)
        except GeneratorExit:
            self._finish(user, turn, intact=True)
            raise
        except UserError:
            # Raised before anything was encoded (e.g. the context is full): the turn
            # never happened and the trimmed cache still matches `cached_ids`.
            self._finish(user, turn, intact=True)
            raise
        except BaseException:
            self._finish(user, turn, intact=False)
            raise
        self._finish(user, turn, intact=True)

    def _stream(self, turn: "_Turn") -> Iterator[GenerationResponse]:
        stream = stream_generate(self.model, self.tokenizer, turn.ids[turn.start :],
                                 cache=self.prompt_cache.cache, settings=self.settings)
        with closing(stream):
            for r in stream:
                r = turn.observe(r)
                self.last = r
                yield r
                if r.finish_reason is not None:
                    return

    def _finish(self, user: dict, turn: "_Turn", intact: bool) -> None:
        """Record the turn and make `cached_ids` describe the cache exactly."""
        if turn.events and (turn.answer or turn.finished):
            self.messages += [user, {"role": "assistant", "content": turn.answer}]
        if intact:
            self.prompt_cache.record(turn.cached_ids())
        else:
            self.prompt_cache.clear()


class _Turn:
    """What one reply has produced so far, and so what the cache holds."""

    def __init__(self, ids: list[int], start: int, stops: StopStrings):
        self.ids, self.start, self.stops = ids, start, stops
        self.canvases: list[list[int]] = []
        self.events = 0
        self.current_canvas = 0
        self.answer = ""
        self.finished = False

    def observe(self, r: GenerationResponse) -> GenerationResponse:
        """Track the cache and apply stop strings to one response."""
        self.events += 1
        self.current_canvas = r.canvas
        if r.committed is not None:
            self.canvases.append(list(r.committed))
        delta, hit = self.stops.feed(r.text, final=r.finish_reason is not None)
        self.answer += delta
        finish = "stop" if hit else r.finish_reason
        self.finished = finish is not None
        return replace(r, text=delta, draft=self.stops.cut(r.draft), finish_reason=finish)

    def cached_ids(self) -> list[int]:
        # generate_step encodes the prompt before its first event and a committed canvas
        # only when it resumes for the next canvas: during canvas c the cache holds the
        # prompt and canvases 0..c-1.
        if not self.events:
            return self.ids[: self.start]
        return self.ids + [t for canvas in self.canvases[: self.current_canvas] for t in canvas]
