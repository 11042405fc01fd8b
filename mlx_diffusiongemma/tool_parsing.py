"""Gemma 4 tool calls and thought channels in generated text.

The model writes thoughts as `<|channel>thought\\n...<channel|>` and tool calls as
`<|tool_call>call:NAME{key:<|"|>text<|"|>,n:42}<tool_call|>`: keys unquoted, strings
between `<|"|>` delimiters (so they may hold braces and quotes), several calls back to
back. `OutputParser` splits a stream of committed text deltas (one per canvas, so a call
may span two of them) into answer text, reasoning and tool calls; the server, `chat` and
`generate --json` share it. A call that does not parse stays in the answer as text.
"""

import json
import re
from dataclasses import dataclass, field

TOOL_CALL_START, TOOL_CALL_END = "<|tool_call>", "<tool_call|>"
THOUGHT_START, THOUGHT_END = "<|channel>", "<channel|>"
STRING_DELIMITER = '<|"|>'
THOUGHT_LABEL = "thought\n"
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_BARE_KEY = re.compile(r"[A-Za-z_$][\w$.\-]*")


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments as a JSON-able dict."""

    name: str
    arguments: dict

    def arguments_json(self) -> str:
        """The arguments as the JSON string OpenAI's `function.arguments` holds."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class Parsed:
    """Pieces of output: answer text, reasoning text and complete tool calls."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: "Parsed") -> "Parsed":
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        return self


class _Reader:
    """A cursor over the argument text of one call."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, token: str) -> bool:
        self.skip_space()
        return self.text.startswith(token, self.pos)

    def take(self, token: str) -> None:
        if not self.peek(token):
            raise ValueError(f"expected {token!r} at {self.pos}")
        self.pos += len(token)

    def delimited(self) -> str:
        self.take(STRING_DELIMITER)
        end = self.text.find(STRING_DELIMITER, self.pos)
        if end < 0:
            raise ValueError("unterminated string")
        value, self.pos = self.text[self.pos:end], end + len(STRING_DELIMITER)
        return value

    def quoted(self) -> str:
        # A JSON string literal: let the JSON decoder find where it ends.
        value, end = json.JSONDecoder().raw_decode(self.text, self.pos)
        if not isinstance(value, str):
            raise ValueError("expected a string")
        self.pos = end
        return value

    def key(self) -> str:
        if self.peek(STRING_DELIMITER):
            return self.delimited()
        if self.peek('"'):
            return self.quoted()
        match = _BARE_KEY.match(self.text, self.pos)
        if not match:
            raise ValueError(f"expected a key at {self.pos}")
        self.pos = match.end()
        return match.group()

    def value(self):
        self.skip_space()
        if self.peek(STRING_DELIMITER):
            return self.delimited()
        if self.peek('"'):
            return self.quoted()
        if self.peek("{"):
            return self.object()
        if self.peek("["):
            return self.array()
        for word, value in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return value
        match = _NUMBER.match(self.text, self.pos)
        if not match:
            raise ValueError(f"expected a value at {self.pos}")
        self.pos = match.end()
        return json.loads(match.group())

    def items(self, close: str, item) -> None:
        if self.peek(close):
            self.take(close)
            return
        while True:
            item()
            if self.peek(","):
                self.take(",")
                continue
            self.take(close)
            return

    def object(self) -> dict:
        self.take("{")
        out: dict = {}

        def member():
            key = self.key()
            self.take(":")
            out[key] = self.value()

        self.items("}", member)
        return out

    def array(self) -> list:
        self.take("[")
        out: list = []
        self.items("]", lambda: out.append(self.value()))
        return out


def parse_arguments(text: str) -> dict:
    """Gemma 4's argument object (`{key:<|"|>s<|"|>,n:1,o:{...},l:[...]}`) as a dict;
    raises ValueError when it is malformed or followed by anything but whitespace."""
    reader = _Reader(text)
    value = reader.object()
    reader.skip_space()
    if reader.pos != len(text):
        raise ValueError(f"unexpected text after the arguments at {reader.pos}")
    return value


def parse_tool_call(body: str) -> ToolCall | None:
    """The call between `<|tool_call>` and `<tool_call|>` (`call:NAME{...}`), or None."""
    body = body.strip()
    if not body.startswith("call:"):
        return None
    brace = body.find("{")
    name = body[len("call:"):brace].strip() if brace >= 0 else ""
    if not name or not _BARE_KEY.fullmatch(name):
        return None
    try:
        return ToolCall(name, parse_arguments(body[brace:]))
    except (ValueError, RecursionError):
        return None


def _partial_marker(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that begins one of `markers`."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest


class OutputParser:
    """Splits streamed text into answer, reasoning and tool calls.

    `feed(delta)` returns what can be told apart so far; text that might begin a marker,
    a thought label or an unfinished call is held until a later delta (or `final`)
    settles it. After the last delta, `thought_unfinished` says whether the output ended
    inside a thought (thinking used the whole budget and no answer was written).
    """

    def __init__(self):
        self.state = "content"
        self.buffer = ""
        self.label_pending = False
        self.thought_unfinished = False
        self.calls = 0

    def feed(self, delta: str, final: bool = False) -> Parsed:
        """Parse one more piece of text; `final` flushes everything held back."""
        self.buffer += delta
        out = Parsed()
        while True:
            progressed = getattr(self, f"_{self.state}")(out, final)
            if not progressed:
                break
        if final:
            self._flush(out)
        return out

    def _content(self, out: Parsed, final: bool) -> bool:
        starts = [(i, m) for m in (THOUGHT_START, TOOL_CALL_START) if (i := self.buffer.find(m)) >= 0]
        if starts:
            i, marker = min(starts)
            out.content += self.buffer[:i]
            self.buffer = self.buffer[i + len(marker):]
            if marker == THOUGHT_START:
                self.state, self.label_pending = "thought", True
            else:
                self.state = "call"
            return True
        keep = 0 if final else _partial_marker(self.buffer, (THOUGHT_START, TOOL_CALL_START))
        out.content += self.buffer[:len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _thought(self, out: Parsed, final: bool) -> bool:
        if self.label_pending:
            # The channel's name ("thought\n") is grammar, not part of the reasoning.
            if self.buffer.startswith(THOUGHT_LABEL):
                self.buffer = self.buffer[len(THOUGHT_LABEL):]
            elif THOUGHT_LABEL.startswith(self.buffer) and not final:
                return False
            self.label_pending = False
        end = self.buffer.find(THOUGHT_END)
        if end >= 0:
            out.reasoning += self.buffer[:end]
            self.buffer = self.buffer[end + len(THOUGHT_END):]
            self.state = "content"
            return True
        keep = 0 if final else _partial_marker(self.buffer, (THOUGHT_END,))
        out.reasoning += self.buffer[:len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _call(self, out: Parsed, final: bool) -> bool:
        end = self.buffer.find(TOOL_CALL_END)
        if end < 0:
            return False
        body = self.buffer[:end]
        self.buffer = self.buffer[end + len(TOOL_CALL_END):]
        call = parse_tool_call(body)
        if call is None:
            out.content += TOOL_CALL_START + body + TOOL_CALL_END
        else:
            out.tool_calls.append(call)
            self.calls += 1
        self.state = "content"
        return True

    def _flush(self, out: Parsed) -> None:
        if self.state == "call":
            # A call the output never closed is text, as the model wrote it.
            out.content += TOOL_CALL_START + self.buffer
        elif self.state == "thought":
            out.reasoning += self.buffer
            self.thought_unfinished = True
        else:
            out.content += self.buffer
        self.buffer = ""
        self.state = "content"


def parse_output(text: str) -> Parsed:
    """Parse a whole output at once (the same result as feeding it in any pieces)."""
    return OutputParser().feed(text, final=True)
