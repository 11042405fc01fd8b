"""The Typer application and its error handling: every mistake a user can fix is one line
on stderr with a non-zero exit, never a traceback."""

import os
import signal
import sys
import threading
from contextlib import contextmanager
from types import SimpleNamespace

import typer
from typer.core import TyperGroup

from ..errors import UserError

EXIT_INTERRUPTED = 130


def one_line(text: str) -> str:
    """Whitespace (newlines included) folded to single spaces."""
    return " ".join(str(text).split())


def error(message) -> None:
    """Print `error: MESSAGE` as one line on stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    """Print a message for the user on stderr."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def deferred_interrupt():
    """While generating, Ctrl-C only raises a flag (`.requested`), which the loop checks
    after each step: the encoder cache is never cut mid-update, and an interrupt cannot be
    lost in code that swallows exceptions (a destructor, a callback). A second Ctrl-C
    interrupts at once (a chat session then rebuilds its cache on the next turn)."""
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
            error(f"{e.format_message()} (see --help)")
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            error(e)
            raise typer.Exit(1) from None
        except BrokenPipeError:
            _quiet_stdout()
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=OneLineErrors,
    name="mlx-diffusiongemma",
    help="DiffusionGemma with MLX: generate text, chat, convert checkpoints, solve a Sudoku offline.",
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
