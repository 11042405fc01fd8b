"""The command line as a user meets it: on a real pseudo-terminal (live view, Ctrl-C,
Ctrl-D) and as a separate process behind pipes (bytes that are not UTF-8, a closed
stdout, an offline Hub id)."""

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import unicodedata

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mlx_diffusiongemma import GenerationResponse, cli
from mlx_diffusiongemma.ui.live import LiveView, printable
from test_chat import tiny_chat_model

COLS, ROWS = 200, 50
CLI = [sys.executable, "-m", "mlx_diffusiongemma"]
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_chat_model(tmp_path_factory.mktemp("term")))


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory):
    """A model with no EOS id, so a reply always runs until Ctrl-C lands in it."""
    path = tiny_chat_model(tmp_path_factory.mktemp("endless"))
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": []}))
    return str(path)


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR")}
    return {**env, "TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **extra}


class Terminal:
    """A command on a COLS x ROWS pseudo-terminal; keeps every byte it writes."""

    def __init__(self, args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: size its terminal, then become the command
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
            os.execvpe(args[0], args, child_env())
        self.raw = b""

    def read_until(self, text: str, timeout: float = 60.0, start: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.raw[start:]:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"{text!r} never appeared; output so far: {self.raw[-2000:]!r}")

    def _read(self, timeout: float) -> bool:
        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += chunk
        return bool(chunk)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline - time.monotonic()):
            pass
        for _ in range(100):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the command did not exit")

    def screen(self) -> list[str]:
        return replay(self.raw.decode("utf-8", "replace"))


def replay(output: str) -> list[str]:
    """What a terminal shows after `output`: the cursor moves and erases that rich and
    readline use are applied; any other control sequence fails the test."""
    grid, row, col = [[]], 0, 0
    for piece in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n|\x07|\x08)", output):
        if piece in ("\x07", ""):
            continue
        if piece == "\r":
            col = 0
        elif piece == "\b":
            col = max(col - 1, 0)
        elif piece == "\n":
            row += 1
        elif piece.startswith("\x1b"):
            row, col = control(grid, row, col, *CSI.fullmatch(piece).groups())
        else:
            row, col = put(grid, row, col, piece)
        grid += [[] for _ in range(row + 1 - len(grid))]
    return ["".join(cells).rstrip() for cells in grid]


def control(grid, row, col, arg, code):
    n = int(arg) if arg.isdigit() else 1
    grid += [[] for _ in range(row + 1 - len(grid))]
    if code == "m" or (code in "hl" and arg.startswith("?")):
        return row, col  # styles, cursor visibility, bracketed paste
    if code == "K":
        grid[row] = [] if arg == "2" else grid[row][:col]
        return row, col
    if code in "AB":
        return max(row + (n if code == "B" else -n), 0), col
    if code in "CD":
        return row, max(col + (n if code == "C" else -n), 0)
    if code == "G":
        return row, n - 1
    raise AssertionError(f"unexpected control sequence ESC[{arg}{code}")


def put(grid, row, col, text):
    for ch in text:
        width = 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        if col + width > COLS:
            row, col = row + 1, 0
        grid += [[] for _ in range(row + 1 - len(grid))]
        cells = grid[row] + [" "] * max(0, col + width - len(grid[row]))
        cells[col : col + width] = [ch] + [""] * (width - 1)
        grid[row], col = cells, col + width
    return row, col


def reference_text(model_dir, *args):
    result = CliRunner().invoke(cli.app, ["generate", "-m", model_dir, "--json", *args])
    return json.loads(result.stdout)["text"]


def shown(text: str) -> str:
    return "\n".join(line.rstrip() for line in printable(text).split("\n"))


def test_live_view_draws_each_step_then_leaves_only_the_committed_text(model_dir):
    args = ["Hello there", "--max-tokens", "16", "--steps", "6", "--seed", "0"]
    term = Terminal([*CLI, "generate", "-m", model_dir, *args])
    assert term.wait() == 0
    frames = re.findall(rb"canvas (\d) \xc2\xb7 step (\d)/6", term.raw)
    assert len(set(frames)) >= 4, "the canvas was not redrawn step by step"
    assert b"\x1b[2m" in term.raw  # drafts are drawn dim
    screen = "\n".join(term.screen()).strip()
    text, stats = screen.rsplit("\n", 1)
    assert text == shown(reference_text(model_dir, *args)).strip("\n")
    assert stats.startswith("prompt: ") and "tokens/forward" in stats
    assert "step " not in screen


def test_ctrl_c_in_generate_keeps_committed_text_and_exits_130(endless_model_dir):
    model_dir = endless_model_dir
    term = Terminal([*CLI, "generate", "Hi", "-m", model_dir, "--max-tokens", "2048", "--seed", "1"])
    term.read_until("canvas 2 ")
    term.send(b"\x03")
    assert term.wait() == 130
    # The same seed writes the same first canvas whatever --max-tokens is.
    first = shown(reference_text(model_dir, "Hi", "--max-tokens", "8", "--seed", "1")).rstrip("\ufffd")
    screen = "\n".join(term.screen())
    assert first and first in screen
    assert "step " not in screen and "Traceback" not in screen


def test_ctrl_c_mid_reply_returns_to_the_prompt_and_ctrl_d_exits_0(endless_model_dir):
    term = Terminal([*CLI, "chat", "-m", endless_model_dir, "--max-tokens", "2048", "--seed", "2"])
    term.read_until(">>> ")
    term.send(b"Tell me a long story\r")
    term.read_until("canvas 2 ")
    mark = len(term.raw)
    term.send(b"\x03")
    term.read_until("(reply stopped)", timeout=10, start=mark)
    term.read_until(">>> ", timeout=10, start=mark)
    term.send(b"/stats\r")
    term.read_until("tokens cached", start=mark)
    # Readline takes over the terminal when it shows the prompt; a ^D sent earlier
    # could be lost in the switch.
    term.read_until(">>> ", start=term.raw.rindex(b"tokens cached"))
    term.send(b"\x04")
    assert term.wait() == 0
    screen = "\n".join(term.screen())
    assert "1 turns" in screen and "Traceback" not in screen
    assert not re.search(r"canvas \d+ · step", screen)


def run(args, stdin=b"", **env):
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, env=child_env(**env), timeout=120)


def test_piped_output_is_plain_text_even_from_argv_bytes_that_are_not_utf8(model_dir):
    proc = run([b"generate", b"caf\xe9 \xff", b"-m", model_dir.encode(), b"--max-tokens", b"16",
                b"--steps", b"3", b"--seed", b"0"])
    assert proc.returncode == 0, proc.stderr
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", proc.stdout)
    assert b"tokens/forward" in proc.stderr and b"Traceback" not in proc.stderr


def test_chat_on_piped_bytes_that_are_not_utf8_ends_with_exit_0(model_dir):
    proc = run(["chat", "-m", model_dir, "--max-tokens", "16", "--steps", "3", "--seed", "0"],
               stdin=b"caf\xe9\n\xff\xfe\x80\n/stats\n")
    assert proc.returncode == 0, proc.stderr
    assert b"2 turns" in proc.stdout and b"Traceback" not in proc.stderr


def test_closed_stdout_exits_quietly(model_dir):
    args = ["generate", "Hi", "-m", model_dir, "--max-tokens", "64", "--steps", "2", "--seed", "0"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    proc.stdout.close()  # like `| head` once it has read enough
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert err == b""


def test_uncached_hub_id_offline_is_one_line(tmp_path):
    proc = run(["generate", "Hi", "-m", "someone/not-cached-model"], HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "someone/not-cached-model" in lines[0]


@pytest.mark.parametrize("command,stdin", [("generate", b""), ("chat", b"Hi\n")])
def test_default_model_offline_and_uncached_names_the_offline_demo(tmp_path, command, stdin):
    args = ["generate", "Hi"] if command == "generate" else ["chat"]
    proc = run(args, stdin, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "mlx-community/diffusiongemma-26B-A4B-it-4bit" in lines[0] and "mlx-diffusiongemma sudoku" in lines[0]


def response(text="", draft="", canvas=0, step=1, committed=None):
    return GenerationResponse(text=text, draft=draft, canvas=canvas, step=step, accepted=1, mean_entropy=0.5,
                              committed=committed, prompt_tokens=3, prompt_tps=1.0, generation_tokens=0,
                              generation_tps=0.0)


def test_live_view_shows_thoughts_in_italics_without_markers():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=COLS, height=ROWS, color_system="standard")
    with LiveView(console, max_steps=4, canvas_length=8) as view:
        view.update(response(draft="<|channel>thought\nhm"))
        view.update(response(text="<|channel>thought\nhmm, 2+2", committed=[5]))
        view.update(response(canvas=1, draft="<channel|>Four"))
        view.update(response(text="<channel|>Four.", canvas=1, committed=[6]))
    assert replay(out.getvalue())[:3] == ["thought", "hmm, 2+2Four.", ""]
    assert "\x1b[2;3mhmm, 2+2\x1b[0mFour." in out.getvalue()
