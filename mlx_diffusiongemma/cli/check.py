"""`mlx-diffusiongemma check`: one bidirectional pass over a text, flagging the tokens the
model finds unlikely given both sides."""

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from ..chat import repair_text
from ..infill import CheckResult, check as check_text
from ..ui.live import printable
from .app import app
from .infill import FileArgument, read_source
from .options import ModelOption, load_model_option

FLAG_STYLE = "bold white on red"


def _position(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"{line}:{column}"


def highlighted(result: CheckResult, top: int) -> Text:
    """The text with its `top` unlikeliest tokens highlighted."""
    out = Text(printable(result.text))
    for t in result.unlikeliest(top):
        if t.end > t.start:
            out.stylize(FLAG_STYLE, t.start, t.end)
    return out


def report_lines(result: CheckResult, top: int) -> list[str]:
    """One line per flagged token: rank, surprise, probability, line:column, the token."""
    return [f"{rank}. {t.surprise:7.3f} nats  p={t.probability:.2e}  {_position(result.text, t.start)}  "
            f"{json.dumps(t.piece, ensure_ascii=False)}"
            for rank, t in enumerate(result.unlikeliest(top), start=1)]


def json_report(result: CheckResult, top: int) -> str:
    tokens = [dict(index=t.index, token=t.token, start=t.start, end=t.end, text=t.piece, surprise=t.surprise)
              for t in result.tokens]
    return json.dumps(dict(tokens=tokens, mean_surprise=result.mean_surprise,
                           unlikeliest=[t.index for t in result.unlikeliest(top)]), ensure_ascii=False)


@app.command()
def check(
    file: FileArgument,
    model: ModelOption = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many of the unlikeliest tokens to flag.")] = 10,
    prompt: Annotated[str | None, typer.Option(
        help="Context before the text (not scored); with --chat, the user turn the text answers.",
        show_default="none")] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Score the text as the model's reply to --prompt in the chat template.")] = False,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object with every token's surprise.")] = False,
):
    """Score every token of a text in one bidirectional pass: its surprise -log p given the
    text on both sides. On a terminal the text is shown with the --top unlikeliest tokens
    highlighted, then a list of them; piped, only the list; --json gives every token.
    """
    text = read_source(file)
    prompt = repair_text(prompt) if prompt is not None else None
    loaded, tokenizer = load_model_option(model)
    result = check_text(loaded, tokenizer, text, prompt=prompt, chat=chat)
    if json_output:
        print(json_report(result, top), flush=True)
        return
    console = Console(highlight=False)
    if sys.stdout.isatty():
        console.print(highlighted(result, top), soft_wrap=True)
        console.print()
    for line in report_lines(result, top):
        print(line)
    Console(stderr=True, highlight=False).print(
        f"{len(result.tokens)} tokens · mean surprise {result.mean_surprise:.3f} nats/token", style="dim")
