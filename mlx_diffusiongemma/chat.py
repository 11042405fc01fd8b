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
from .prompt_cache import PromptCache, reply_keep


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
        # The conversation's images (`PreparedImage`s) in the order the template writes them.
        self.images: list = []
        self.last: GenerationResponse | None = None
        self.last_turn: TurnStats | None = None

    def _default_keep(self) -> int:
        return reply_keep(self.model.args, self.settings.max_tokens)

    def reset(self) -> None:
        """Forget the conversation (the system prompt and thinking mode stay)."""
        self.messages = []
        self.images = []
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

    def reply(self, text: str, images: Sequence | None = None) -> Iterator[GenerationResponse]:
        """Add a user message and stream the answer as `GenerationResponse`s whose `text`
        is the committed delta (cut at stop strings).

        `images` (paths, PIL images or uint8 arrays) go before the text as image content
        parts, which the chat template writes as placeholders. They are loaded here, so a bad
        one fails before the turn starts; later turns reuse the cache over them.

        Closing the iterator early (Ctrl-C) keeps the turn with the text committed so
        far, and leaves the cache holding exactly what `cached_ids` says.
        """
        text = repair_text(text)
        if not text.strip():
            raise UserError("the message is empty; type some text")
        if not images:
            return self._turn({"role": "user", "content": text})
        from .images import prepare_for

        prepared = prepare_for(self.model, images)
        content = [{"type": "image"} for _ in prepared] + [{"type": "text", "text": text}]
        return self._turn({"role": "user", "content": content}, prepared)

    def _turn(self, user: dict, new_images: Sequence = ()) -> Iterator[GenerationResponse]:
        ids = self.prompt_ids(self.messages + [user])
        images, keys = self.images + list(new_images), None
        if images:
            from .images import expand_for, prefix_keys

            ids = expand_for(self.model, ids, images)
            # The cache is matched on the images' contents, not on their (equal) token ids.
            keys = prefix_keys(ids, images, self.model.args.image_token_id)
        start = self.prompt_cache.reuse(ids if keys is None else keys)
        self.last_turn = TurnStats(len(ids), start)
        turn = _Turn(ids, start, StopStrings(self.stop), keys, images)
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
                                 cache=self.prompt_cache.cache, settings=self.settings,
                                 images=turn.uncached_images(self.model.args.image_token_id) or None)
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
            self.images = turn.images
        if intact:
            self.prompt_cache.record(turn.cached_ids())
        else:
            self.prompt_cache.clear()


class _Turn:
    """What one reply has produced so far, and so what the cache holds."""

    def __init__(self, ids: list[int], start: int, stops: StopStrings, keys: list | None = None,
                 images: Sequence = ()):
        self.ids, self.start, self.stops = ids, start, stops
        # What the prompt cache compares: the ids, image tokens named after their image.
        self.keys = ids if keys is None else keys
        self.images = list(images)
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

    def uncached_images(self, image_token_id: int) -> list:
        """The images whose tokens lie after the reused prefix (they must be encoded)."""
        if not self.images:
            return []
        from .images import images_after

        return images_after(self.ids, self.images, image_token_id, self.start)

    def cached_ids(self) -> list:
        # generate_step encodes the prompt before its first event and a committed canvas
        # only when it resumes for the next canvas: during canvas c the cache holds the
        # prompt and canvases 0..c-1.
        if not self.events:
            return self.keys[: self.start]
        return self.keys + [t for canvas in self.canvases[: self.current_canvas] for t in canvas]
