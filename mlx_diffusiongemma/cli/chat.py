"""`mlx-diffusiongemma chat`: a conversation on the terminal that reuses the encoder cache."""

import sys
from contextlib import closing
from typing import Annotated

import typer

from ..chat import ChatSession, repair_text
from ..errors import UserError
from ..generate import format_stats
from .app import app, deferred_interrupt, error, info
from .generate import view_for
from .options import (
    AdapterPathOption, EntropyOption, FastOption, FullCanvasOption, MaxTokensOption, MinCanvasOption, ModelOption,
    SamplerOption, SeedOption, StepsOption, StopOption, SystemOption, ThinkOption, ThresholdOption, TMaxOption,
    TMinOption, TopKOption, session_for, settings_from, speed_settings,
)

CHAT_HELP = ("/image PATH · /think on|off · /system TEXT · /reset · /stats · /quit   "
             "(Ctrl-C stops a reply, Ctrl-D exits)")


def _chat_reply(session: ChatSession, line: str) -> None:
    stopped = False
    try:
        images, session.pending_images = _pending(session), []
        with (deferred_interrupt() as interrupt, view_for(session) as view,
              closing(session.reply(line, images=images or None)) as replies):
            for r in replies:
                view.update(r)
                if interrupt.requested:
                    break
        stopped = interrupt.requested
    except KeyboardInterrupt:
        stopped = True
    except UserError as e:
        error(e)
    if stopped:
        info("(reply stopped)")


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
        info("(Ctrl-D or /quit exits)")
        return ""


def _chat_command(session: ChatSession, line: str) -> bool:
    """Run a /command; False means leave the chat."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    handler = _CHAT_COMMANDS.get(name)
    if handler is None:
        error(f"unknown command {name}; commands: {CHAT_HELP}")
    else:
        handler(session, arg)
    return True


def _think(session: ChatSession, arg: str) -> None:
    if arg.lower() in ("on", "off"):
        session.thinking = arg.lower() == "on"
    elif arg:
        error(f"/think takes 'on' or 'off', not {arg!r}")
        return
    print(f"thinking {'on' if session.thinking else 'off'}")


def _system(session: ChatSession, arg: str) -> None:
    session.system = arg or None
    print("system prompt set" if arg else "system prompt cleared")


def _reset(session: ChatSession, arg: str) -> None:
    session.reset()
    session.pending_images = []
    print("conversation cleared")


def _stats(session: ChatSession, arg: str) -> None:
    if session.last is None or session.last_turn is None:
        print("no reply yet")
        return
    turn = session.last_turn
    print(format_stats(session.last))
    print(f"conversation: {len(session.messages) // 2} turns, {len(session.prompt_cache.ids)} tokens cached | "
          f"last prompt: {turn.prompt_tokens} tokens, {turn.reused_tokens} reused, {turn.encoded_tokens} encoded")


def _pending(session: ChatSession) -> list:
    # Images attached with /image wait here for the next message.
    return getattr(session, "pending_images", [])


def _image(session: ChatSession, arg: str) -> None:
    if not arg:
        error("/image takes the path of an image file")
        return
    from ..images import check_takes_images, load_image

    try:
        check_takes_images(session.model)
        session.pending_images = _pending(session) + [load_image(arg)]
    except UserError as e:
        error(e)
        return
    print(f"image {len(session.pending_images)} attached to your next message")


def _help(session: ChatSession, arg: str) -> None:
    print(CHAT_HELP)


_CHAT_COMMANDS = {"/image": _image, "/think": _think, "/system": _system, "/reset": _reset, "/stats": _stats, "/help": _help}


@app.command()
def chat(
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
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="Leave the vision tower out (saves its memory; /image is then refused).")] = False,
):
    """Chat with the model (thinking off by default).

    Commands: /image PATH (attach an image to the next message), /think on|off, /system TEXT,
    /reset, /stats, /quit.
    Ctrl-C stops a reply and keeps the conversation; Ctrl-D leaves.
    Each turn encodes only what the encoder cache does not hold yet.
    """
    settings = settings_from(max_tokens, steps, t_min, t_max, entropy_bound, seed) | speed_settings(
        fast, sampler, threshold, self_conditioning_top_k, full_canvas, min_canvas_length)
    session = session_for(model, settings, system, think, stop, adapter_path=adapter_path, text_only=text_only)
    interactive = _prepare_stdin()
    info(CHAT_HELP)
    while (line := _read_line(interactive)) is not None:
        if line.startswith("/"):
            if not _chat_command(session, line):
                return
        elif line.strip():
            _chat_reply(session, line)


