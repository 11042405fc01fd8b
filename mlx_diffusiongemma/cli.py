"""The `mlx-diffusiongemma` command line: generate, chat and convert.

A thin shell over the Python API: options carry the names of `GenerationSettings` and
`convert`, and every mistake a user can fix is one line on stderr with a non-zero exit.
"""

import io
import json
import os
import signal
import sys
import threading
import warnings
from contextlib import closing, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from typer.core import TyperGroup

from .chat import ChatSession, repair_text
from .errors import UserError
from .generate import REFERENCE_DEFAULTS, GenerationResponse, format_stats
from .live import LiveView, PlainView
from .sudoku import DEFAULT_BLANKS, MAX_BLANKS

EXIT_INTERRUPTED = 130
CHAT_HELP = "/think on|off · /system TEXT · /reset · /stats · /quit   (Ctrl-C stops a reply, Ctrl-D exits)"


def default_model_path() -> Path:
    """The small Sudoku model shipped inside the package, used when no --model is given."""
    return Path(__file__).parent / "assets" / "sudoku"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message) -> None:
    print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet_stdout() -> None:
    # The reader went away (`| head`): send whatever is still buffered to /dev/null so
    # the interpreter's final flush cannot print a BrokenPipeError.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class OneLineErrors(TyperGroup):
    """Turns usage errors, `UserError`s and closed pipes into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = sys.argv[1:] if args is None else list(args)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args or ["--help"], prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:
            _error(f"{e.format_message()} (see --help)")
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            _error(e)
            raise typer.Exit(1) from None
        except BrokenPipeError:
            _quiet_stdout()
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=OneLineErrors,
    name="mlx-diffusiongemma",
    help="DiffusionGemma with MLX: generate text, chat, convert checkpoints.",
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value} is not > 0.")
    return value


# Sampling defaults come from the model's generation_config.json, else the reference's.
_FROM_CONFIG = "model's or {}"

ModelOption = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model directory or Hugging Face repo id.",
    show_default="packaged Sudoku model")]
MaxTokensOption = Annotated[int | None, typer.Option(
    min=1, help="Most tokens to generate; whole canvases are written.",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["max_tokens"]))]
StepsOption = Annotated[int | None, typer.Option(
    "--steps", min=1, help="Most denoising steps per canvas.",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["max_denoising_steps"]))]
TMinOption = Annotated[float | None, typer.Option(
    min=0.0, help="Temperature of the last denoising step.",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["t_min"]))]
TMaxOption = Annotated[float | None, typer.Option(
    min=0.0, help="Temperature of the first denoising step (must exceed --t-min).",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["t_max"]))]
EntropyOption = Annotated[float | None, typer.Option(
    callback=_positive, help="Entropy budget (nats) for accepting sampled tokens each step.",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["entropy_bound"]))]
SeedOption = Annotated[int | None, typer.Option(
    help="Random seed for reproducible output.", show_default="a fresh seed each run")]
SystemOption = Annotated[str | None, typer.Option(help="System prompt.", show_default="none")]
ThinkOption = Annotated[bool, typer.Option(
    "--think/--no-think", help="Let the model think before answering.")]
StopOption = Annotated[list[str] | None, typer.Option(
    "--stop", help="End the reply where this text appears, cutting it (repeatable).", show_default="none")]


def _settings(max_tokens, steps, t_min, t_max, entropy_bound, seed) -> dict:
    if t_min is not None and t_max is not None and t_max <= t_min:
        raise UserError(f"--t-max ({t_max}) must be greater than --t-min ({t_min})")
    return dict(max_tokens=max_tokens, max_denoising_steps=steps, t_min=t_min, t_max=t_max,
                entropy_bound=entropy_bound, seed=seed)


def _load(model: str | None):
    # Imported here so `--help` does not pay for importing mlx-lm and transformers.
    from .loading import load

    if model is not None:
        return load(model)
    path = default_model_path()
    if not path.is_dir():
        raise UserError(f"the packaged Sudoku model is not installed ({path}); "
                        "pass --model with a model directory or Hugging Face repo id")
    return load(path)


def _session(model, settings: dict, system, think, stop, keep=None) -> ChatSession:
    model, tokenizer = _load(model)
    return ChatSession(model, tokenizer, system=system, thinking=think, stop=stop or (),
                       keep=keep, **settings)


def _view(session: ChatSession, json_output: bool = False):
    if json_output:
        return PlainView(io.StringIO())
    if sys.stdout.isatty():
        s = session.resolved
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


def _read_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is not None:
        return stream.read().decode("utf-8", "replace")
    return repair_text(sys.stdin.read())


def _stream_reply(session: ChatSession, text: str, view, collected: list) -> GenerationResponse | None:
    """Show one reply; `collected` gets each committed delta even if interrupted."""
    last = None
    with view, closing(session.reply(text)) as replies:
        for last in replies:
            collected.append(last.text)
            view.update(last)
    return last


def _json_report(text: str, r: GenerationResponse | None, finish: str | None) -> str:
    stats = {} if r is None else dict(
        prompt_tokens=r.prompt_tokens, prompt_tps=r.prompt_tps, generation_tokens=r.generation_tokens,
        generation_tps=r.generation_tps, steps=r.steps, steps_per_canvas=r.steps_per_canvas,
        decoder_forwards=r.decoder_forwards, tokens_per_forward=r.tokens_per_forward,
        peak_memory_gb=r.peak_memory,
    )
    return json.dumps(dict(text=text, finish_reason=finish, **stats), ensure_ascii=False)


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(
        help="The prompt; '-' reads it from standard input.", show_default=False)] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Read the prompt from this file.", show_default="none")] = None,
    model: ModelOption = None,
    max_tokens: MaxTokensOption = None,
    steps: StepsOption = None,
    t_min: TMinOption = None,
    t_max: TMaxOption = None,
    entropy_bound: EntropyOption = None,
    seed: SeedOption = None,
    system: SystemOption = None,
    think: ThinkOption = False,
    stop: StopOption = None,
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
    settings = _settings(max_tokens, steps, t_min, t_max, entropy_bound, seed)
    session = _session(model, settings, system, think, stop, keep=0)
    collected: list[str] = []
    last = None
    try:
        last = _stream_reply(session, text, _view(session, json_output), collected)
    except KeyboardInterrupt:
        if json_output:
            print(_json_report("".join(collected), session.last, "interrupted"), flush=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if json_output:
        print(_json_report("".join(collected), last, last.finish_reason if last else None), flush=True)
    elif last is not None:
        Console(stderr=True, highlight=False).print(format_stats(last), style="dim", soft_wrap=True)


@contextmanager
def _deferred_interrupt():
    """During a chat reply Ctrl-C only raises a flag, which the reply loop checks after
    each step, so the encoder cache is never cut mid-update. A second Ctrl-C interrupts
    at once (the session then rebuilds its cache on the next turn)."""
    state = SimpleNamespace(requested=False)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state.requested:
            raise KeyboardInterrupt
        state.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def _chat_reply(session: ChatSession, line: str) -> None:
    stopped = False
    try:
        with _deferred_interrupt() as interrupt, _view(session) as view, closing(session.reply(line)) as replies:
            for r in replies:
                view.update(r)
                if interrupt.requested:
                    break
        stopped = interrupt.requested
    except KeyboardInterrupt:
        stopped = True
    except UserError as e:
        _error(e)
    if stopped:
        _info("(reply stopped)")


def _prepare_stdin() -> bool:
    """Let undecodable input bytes through as surrogates (repaired per line); line
    editing on a terminal. Returns whether the input is a terminal."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):
            pass
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() gains history and editing)
        except ImportError:
            pass
    return interactive


def _read_line(interactive: bool) -> str | None:
    """One line of input, repaired; None at end of input."""
    try:
        return repair_text(input(">>> " if interactive else ""))
    except EOFError:
        if interactive:
            print()
        return None
    except KeyboardInterrupt:
        print()
        _info("(Ctrl-D or /quit exits)")
        return ""


def _chat_command(session: ChatSession, line: str) -> bool:
    """Run a /command; False means leave the chat."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    handler = _CHAT_COMMANDS.get(name)
    if handler is None:
        _error(f"unknown command {name}; commands: {CHAT_HELP}")
    else:
        handler(session, arg)
    return True


def _think(session: ChatSession, arg: str) -> None:
    if arg.lower() in ("on", "off"):
        session.thinking = arg.lower() == "on"
    elif arg:
        _error(f"/think takes 'on' or 'off', not {arg!r}")
        return
    print(f"thinking {'on' if session.thinking else 'off'}")


def _system(session: ChatSession, arg: str) -> None:
    session.system = arg or None
    print("system prompt set" if arg else "system prompt cleared")


def _reset(session: ChatSession, arg: str) -> None:
    session.reset()
    print("conversation cleared")


def _stats(session: ChatSession, arg: str) -> None:
    if session.last is None or session.last_turn is None:
        print("no reply yet")
        return
    turn = session.last_turn
    print(format_stats(session.last))
    print(f"conversation: {len(session.messages) // 2} turns, {len(session.cached_ids)} tokens cached | "
          f"last prompt: {turn.prompt_tokens} tokens, {turn.reused_tokens} reused, {turn.encoded_tokens} encoded")


def _help(session: ChatSession, arg: str) -> None:
    print(CHAT_HELP)


_CHAT_COMMANDS = {"/think": _think, "/system": _system, "/reset": _reset, "/stats": _stats, "/help": _help}


@app.command()
def chat(
    model: ModelOption = None,
    max_tokens: MaxTokensOption = None,
    steps: StepsOption = None,
    t_min: TMinOption = None,
    t_max: TMaxOption = None,
    entropy_bound: EntropyOption = None,
    seed: SeedOption = None,
    system: SystemOption = None,
    think: ThinkOption = False,
    stop: StopOption = None,
):
    """Chat with the model (thinking off by default).

    Commands: /think on|off, /system TEXT, /reset, /stats, /quit.
    Ctrl-C stops a reply and keeps the conversation; Ctrl-D leaves.
    Each turn encodes only what the encoder cache does not hold yet.
    """
    settings = _settings(max_tokens, steps, t_min, t_max, entropy_bound, seed)
    session = _session(model, settings, system, think, stop)
    interactive = _prepare_stdin()
    _info(CHAT_HELP)
    while (line := _read_line(interactive)) is not None:
        if line.startswith("/"):
            if not _chat_command(session, line):
                return
        elif line.strip():
            _chat_reply(session, line)


class _ProgressBar:
    """A progress bar on stderr that appears with the first bytes written, so a
    conversion refused up front prints only its error line."""

    def __init__(self):
        self.bar = self.task = None

    def __enter__(self) -> "_ProgressBar":
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            columns = (TextColumn("Converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())
            self.bar = Progress(*columns, console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("convert", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def convert(
    hf_path: Annotated[str, typer.Argument(help="Hugging Face checkpoint: directory or repo id.")],
    mlx_path: Annotated[Path, typer.Argument(help="Output directory for the MLX model.")],
    quantize: Annotated[bool, typer.Option(
        "--quantize/--no-quantize", help="Quantize the weights (see --recipe).")] = True,
    q_bits: Annotated[int, typer.Option(help="Bits of the quantized experts (2, 3, 4, 5, 6 or 8).")] = 4,
    q_group_size: Annotated[int, typer.Option(help="Quantization group size (32, 64 or 128).")] = 64,
    recipe: Annotated[str, typer.Option(
        help="'mixed': experts at --q-bits, the rest at 8 bits; '8bit': everything at 8 bits.")] = "mixed",
    dtype: Annotated[str | None, typer.Option(
        help="Float type of unquantized tensors and scales: bfloat16, float16 or float32.",
        show_default="the checkpoint's own")] = None,
    text_only: Annotated[bool, typer.Option("--text-only", help="Leave the vision tower out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
):
    """Convert a Hugging Face DiffusionGemma checkpoint to an MLX model directory."""
    from . import convert as converter  # the converter lands separately from the CLI

    try:
        with warnings.catch_warnings(record=True) as caught, _ProgressBar() as progress:
            warnings.simplefilter("always")
            out = converter.convert(
                hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
                recipe=recipe, dtype=dtype, text_only=text_only, overwrite=overwrite, progress=progress,
            )
    except KeyboardInterrupt as e:
        _error(e.args[0] if e.args else "conversion interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for w in caught:
        _info(f"warning: {_one_line(w.message)}")
    print(f"converted model written to {out}")


@app.command()
def sudoku(
    puzzle: Annotated[str | None, typer.Option(
        help="81 cells row by row, '.' or '0' for blanks.", show_default="a generated one")] = None,
    blanks: Annotated[int, typer.Option(
        min=0, max=MAX_BLANKS,
        help="Blanks in a generated puzzle (the shipped model solves 96% at 30, 71% at 40).",
    )] = DEFAULT_BLANKS,
    seed: Annotated[int | None, typer.Option(help="Seed of the generated puzzle.", show_default="random")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="A Sudoku model directory.", show_default="the one shipped in the package")] = None,
):
    """Solve a Sudoku with the small DiffusionGemma shipped in the package, watching the grid resolve."""
    from . import sudoku_solver

    argv = ["--blanks", str(blanks)]
    for flag, value in (("--puzzle", puzzle), ("--seed", seed), ("--model", model)):
        if value is not None:
            argv += [flag, str(value)]
    raise typer.Exit(sudoku_solver.main(argv))


def main() -> None:
    """Entry point of the `mlx-diffusiongemma` script."""
    app()


__all__ = ["app", "default_model_path", "main"]
