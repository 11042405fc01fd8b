"""`mlx-diffusiongemma infill`: fill the holes of a text, drawing the canvas as it resolves
with the pinned text (what the user wrote) apart from what the model writes."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from ..chat import repair_text
from ..errors import UserError
from ..infill import DEFAULT_HOLE, InfillDraft, InfillResult, split_holes, stream_infill
from ..ui.live import printable
from .app import EXIT_INTERRUPTED, app
from .options import EntropyOption, ModelOption, SeedOption, StepsOption, TMaxOption, TMinOption, load_model_option

PINNED_STYLE = ""
FILL_STYLE = "bold cyan"
DRAFT_STYLE = "dim cyan"

FileArgument = Annotated[str, typer.Argument(help="The text file; '-' reads standard input.", show_default=False)]


def read_source(source: str) -> str:
    """The text of FILE, or of standard input for '-' (undecodable bytes become U+FFFD)."""
    if source == "-":
        stream = getattr(sys.stdin, "buffer", None)
        text = stream.read().decode("utf-8", "replace") if stream is not None else repair_text(sys.stdin.read())
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{source} is not a file; give a text file or '-' for standard input")
        text = path.read_bytes().decode("utf-8", "replace")
    if not text.strip():
        raise UserError(f"{'standard input' if source == '-' else source} is empty; give some text")
    return text


def render_pieces(pieces: list[tuple[str, bool]], head: str, fill_style: str) -> Text:
    """The text so far: the prompt part and pinned pieces plain, the model's pieces styled."""
    out = Text(printable(head), style=PINNED_STYLE)
    for piece, pinned in pieces:
        out.append(printable(piece), style=PINNED_STYLE if pinned else fill_style)
    return out


def _status(d: InfillDraft, max_steps: int | None) -> Text:
    steps = f"/{max_steps}" if max_steps else ""
    lengths = ", ".join(map(str, d.lengths))
    return Text(f"hole lengths {lengths} · canvas {d.canvas + 1} · step {d.step}{steps} · "
                f"{d.accepted} accepted · entropy {d.mean_entropy:.3f}", style="dim italic")


def _run(stream, head: str, live: bool, max_steps: int | None) -> InfillResult | None:
    result = None
    console = Console(highlight=False)
    with Live(console=console, transient=True, auto_refresh=False) if live else _NoLive() as view:
        for item in stream:
            if isinstance(item, InfillResult):
                result = item
            elif live:
                view.update(Text("\n").join([render_pieces(item.pieces, head, DRAFT_STYLE),
                                             _status(item, max_steps)]), refresh=True)
    return result


class _NoLive:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@app.command()
def infill(
    file: FileArgument,
    model: ModelOption = None,
    length: Annotated[list[int] | None, typer.Option(
        "--length", min=1, help="Hole length in tokens: once for every hole, or once per hole in order.",
        show_default="the marker's N, else the model's choice")] = None,
    hole: Annotated[tuple[str, str], typer.Option(
        help="Opening and closing hole markers.")] = DEFAULT_HOLE,
    instruction: Annotated[str | None, typer.Option(
        help="Chat mode: this user turn, the text being the model's reply.", show_default="raw text")] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Chat mode with a user turn that asks to fill the gaps.")] = False,
    steps: StepsOption = None,
    t_min: TMinOption = None,
    t_max: TMaxOption = None,
    entropy_bound: EntropyOption = None,
    seed: SeedOption = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object with the text, fills and hole lengths.")] = False,
):
    """Fill each hole of a text, marked <fill></fill> (or <fill>N</fill> for N tokens).

    The text before the first hole is the prompt; the text between and after the holes is
    pinned and kept byte for byte. A hole without a length is tried at several lengths and
    the one the model scores best is kept. On a terminal the canvas is drawn as it resolves
    (pinned text plain, the model's text in cyan); piped, only the filled text is printed.
    """
    text = read_source(file)
    segments, _ = split_holes(text, hole)  # marker mistakes fail before the (slow) model load
    if instruction is not None:
        instruction = repair_text(instruction)
    lengths = None if not length else (length[0] if len(length) == 1 else list(length))
    settings = dict(max_denoising_steps=steps, t_min=t_min, t_max=t_max, entropy_bound=entropy_bound, seed=seed)
    if t_min is not None and t_max is not None and t_max <= t_min:
        raise UserError(f"--t-max ({t_max}) must be greater than --t-min ({t_min})")
    loaded, tokenizer = load_model_option(model)
    stream = stream_infill(loaded, tokenizer, text, hole=hole, lengths=lengths, instruction=instruction,
                           chat=chat, **settings)
    head = segments[0]
    live = sys.stdout.isatty() and not json_output
    try:
        result = _run(stream, head, live, steps)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if json_output:
        print(json.dumps(dict(text=result.text, fills=result.fills, lengths=list(result.lengths),
                              score=result.score, tried={",".join(map(str, k)): v for k, v in result.tried.items()}),
                         ensure_ascii=False), flush=True)
        return
    if live:
        pieces = [p for fill, segment in zip(result.fills, segments[1:]) for p in ((fill, False), (segment, True))]
        Console(highlight=False).print(render_pieces(pieces, head, FILL_STYLE), soft_wrap=True)
    else:
        sys.stdout.write(printable(result.text) + ("" if result.text.endswith("\n") else "\n"))
        sys.stdout.flush()
    lengths_text = ", ".join(map(str, result.lengths))
    Console(stderr=True, highlight=False).print(
        f"hole lengths {lengths_text} · score {result.score:.3f} nats/token · {len(result.tried)} tried",
        style="dim", soft_wrap=True)

