"""`mlx-diffusiongemma generate`: answer one prompt, drawing the canvas as it resolves."""

import io
import json
import sys
from contextlib import closing
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..chat import ChatSession, repair_text
from ..errors import UserError
from ..generate import GenerationResponse, format_stats
from ..tool_parsing import parse_output
from ..ui.live import LiveView, PlainView
from .app import EXIT_INTERRUPTED, app, deferred_interrupt
from .options import (
    AdapterPathOption, EntropyOption, FastOption, FullCanvasOption, ImageOption, MaxTokensOption, MinCanvasOption,
    ModelOption, SamplerOption, SeedOption, StepsOption, StopOption, SystemOption, ThinkOption, ThresholdOption,
    TMaxOption, TMinOption, TopKOption, session_for, settings_from, speed_settings,
)


def view_for(session: ChatSession, json_output: bool = False):
    """The live canvas view on a terminal, plain text when piped, nothing for --json."""
    if json_output:
        return PlainView(io.StringIO())
    if sys.stdout.isatty():
        s = session.settings
        return LiveView(Console(highlight=False), s.max_denoising_steps, session.model.args.canvas_length)
    return PlainView(sys.stdout)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise UserError("give the prompt either as an argument or with --prompt-file, not both")
    if prompt_file is not None:
        text = prompt_file.read_bytes().decode("utf-8", "replace")
    elif prompt == "-":
        text = _read_stdin()
    elif prompt is not None:
        text = repair_text(prompt)
    else:
        raise UserError("no prompt; pass it as an argument, '-' to read standard input, or --prompt-file")
    if not text.strip():
        raise UserError("the prompt is empty or only whitespace; give some text")
    return text


def _read_images(paths: list[str] | None) -> list:
    """The --image files, decoded now so a bad one fails before the model loads."""
    if not paths:
        return []
    from ..images import load_image

    return [load_image(p) for p in paths]


def _read_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is not None:
        return stream.read().decode("utf-8", "replace")
    return repair_text(sys.stdin.read())


def _stream_reply(session: ChatSession, text: str, view, collected: list, interrupt,
                  images: list | None = None) -> GenerationResponse | None:
    """Show one reply until it ends or `interrupt.requested`; `collected` gets each
    committed delta even if interrupted."""
    last = None
    with view, closing(session.reply(text, images=images)) as replies:
        for last in replies:
            collected.append(last.text)
            view.update(last)
            if interrupt.requested:
                break
    return last


def _json_report(text: str, r: GenerationResponse | None, finish: str | None) -> str:
    stats = {} if r is None else dict(
        prompt_tokens=r.prompt_tokens, prompt_tps=r.prompt_tps, generation_tokens=r.generation_tokens,
        generation_tps=r.generation_tps, steps=r.steps, steps_per_canvas=r.steps_per_canvas,
        decoder_forwards=r.decoder_forwards, tokens_per_forward=r.tokens_per_forward,
        peak_memory_gb=r.peak_memory,
    )
    # The same split the server makes: thoughts and Gemma 4 tool calls apart from the answer.
    parsed = parse_output(text)
    calls = [dict(name=c.name, arguments=c.arguments) for c in parsed.tool_calls]
    return json.dumps(dict(text=text, content=parsed.content, reasoning=parsed.reasoning, tool_calls=calls,
                           finish_reason=finish, **stats), ensure_ascii=False)


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(
        help="The prompt; '-' reads it from standard input.", show_default=False)] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Read the prompt from this file.", show_default="none")] = None,
    model: ModelOption = None,
    adapter_path: AdapterPathOption = None,
    max_tokens: MaxTokensOption = None,
    steps: StepsOption = None,
    t_min: TMinOption = None,
    t_max: TMaxOption = None,
    entropy_bound: EntropyOption = None,
    seed: SeedOption = None,
    fast: FastOption = False,
    sampler: SamplerOption = None,
    threshold: ThresholdOption = None,
    self_conditioning_top_k: TopKOption = None,
    full_canvas: FullCanvasOption = None,
    min_canvas_length: MinCanvasOption = None,
    system: SystemOption = None,
    think: ThinkOption = False,
    stop: StopOption = None,
    image: ImageOption = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object with the text and statistics instead.")] = False,
):
    """Answer one prompt, built with the model's chat template.

    On a terminal the canvas is drawn as it resolves, then replaced by the committed text.
    Piped, only the text is printed. Statistics go to stderr.
    Sampling defaults come from the model's generation_config.json.
    """
    # Options are checked before the (slow) model load so a typo fails at once.
    text = _read_prompt(prompt, prompt_file)
    images = _read_images(image)
    settings = settings_from(max_tokens, steps, t_min, t_max, entropy_bound, seed) | speed_settings(
        fast, sampler, threshold, self_conditioning_top_k, full_canvas, min_canvas_length)
    session = session_for(model, settings, system, think, stop, keep=0, adapter_path=adapter_path,
                          text_only=not images)
    collected: list[str] = []
    last = None
    try:
        with deferred_interrupt() as interrupt:
            last = _stream_reply(session, text, view_for(session, json_output), collected, interrupt, images)
        interrupted = interrupt.requested
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        if json_output:
            print(_json_report("".join(collected), session.last, "interrupted"), flush=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if json_output:
        print(_json_report("".join(collected), last, last.finish_reason if last else None), flush=True)
    elif last is not None:
        Console(stderr=True, highlight=False).print(format_stats(last), style="dim", soft_wrap=True)


