"""How a reply is shown: the canvas resolving in place on a terminal, plain text elsewhere.

Both views take the `GenerationResponse`s of `stream_generate` (or `ChatSession.reply`)
one at a time and are context managers, so an interrupted reply still ends with the
committed text on screen.
"""

import re
import sys

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ..generate import GenerationResponse

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Gemma 4 wraps thoughts in <|channel>thought\n ... <channel|>.
_THOUGHT_MARKERS = re.compile(r"(<\|channel>|<channel\|>)")
THOUGHT_STYLE = "dim italic"


def printable(text: str) -> str:
    """Replace control characters other than newline and tab by visible symbols, so
    model output can neither move the cursor nor restyle the terminal."""
    return _CONTROL.sub(_control_picture, text)


def _control_picture(match: re.Match) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)
    return "\u2421" if code == 0x7F else "\ufffd"


class PlainView:
    """Committed text only, written and flushed as each canvas commits."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.at_line_start = True

    def __enter__(self) -> "PlainView":
        return self

    def update(self, r: GenerationResponse) -> None:
        if r.text:
            self._write(printable(r.text))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
        self.at_line_start = text.endswith("\n")

    def __exit__(self, *exc) -> None:
        if not self.at_line_start:
            self._write("\n")


class LiveView:
    """On a terminal: finished lines of committed text scroll up as usual; below them a
    live region shows the unfinished line, the current canvas's draft (dim) and a status
    line. When the reply ends the live region is erased, leaving only committed text.
    Thoughts are shown in italics without their channel markers."""

    def __init__(self, console: Console, max_steps: int, canvas_length: int):
        self.console = console
        self.max_steps, self.canvas_length = max_steps, canvas_length
        self.tail = Text()
        self.in_thought = False
        self.live = Live(console=console, transient=True, auto_refresh=False)

    def __enter__(self) -> "LiveView":
        self.live.start()
        return self

    def update(self, r: GenerationResponse) -> None:
        if r.text:
            self._commit(printable(r.text))
        self.live.update(self._frame(r), refresh=True)

    def _commit(self, text: str) -> None:
        self.tail.append_text(self._styled(text))
        *lines, self.tail = self.tail.split("\n", allow_blank=True)
        # Only whole lines leave the live region: the terminal cannot take back a
        # half-printed line once the region below it is redrawn.
        if lines:
            self.console.print(Text("\n").join(lines), soft_wrap=True)

    def _styled(self, text: str) -> Text:
        out = Text()
        for piece in _THOUGHT_MARKERS.split(text):
            if piece in ("<|channel>", "<channel|>"):
                self.in_thought = piece == "<|channel>"
            elif piece:
                out.append(piece, style=THOUGHT_STYLE if self.in_thought else "")
        return out

    def _frame(self, r: GenerationResponse) -> Group:
        text = self.tail.copy()
        if r.committed is None:
            text.append(_THOUGHT_MARKERS.sub("", printable(r.draft)), style="dim")
        status = (
            f"canvas {r.canvas + 1} · step {r.step}/{self.max_steps} · "
            f"{r.accepted}/{self.canvas_length} accepted · entropy {r.mean_entropy:.3f}"
        )
        return Group(text, Text(status, style="dim italic"))

    def __exit__(self, *exc) -> None:
        self.live.stop()
        if self.tail:
            self.console.print(self.tail, soft_wrap=True)
            self.tail = Text()
