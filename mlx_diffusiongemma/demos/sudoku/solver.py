"""Solving Sudoku with a small DiffusionGemma: the puzzle is the user turn of a Gemma 4 chat
(nine rows of digits, '.' for blanks) and the model answers with the completed grid in one
canvas, denoised in parallel. With `pin_givens` the given digits are pinned at their
answer positions (`GenerationSettings.pinned`), so the model writes only the blanks.
`show_solve` draws the grid resolving on a terminal."""

from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ...errors import UserError
from ...generate import GenerationResponse, stream_generate
from ...loading import load
from . import puzzles as sudoku

DEFAULT_MODEL = Path(__file__).parent / "model"
UNKNOWN = "?"
# Off by default: on the 500 held-out puzzles per blank count the shipped model solves
# 99.6 / 92.6 / 36.2% at 30 / 40 / 50 blanks with its givens pinned against 99.4 / 93.6 /
# 38.2% free (benchmarks/README.md): level at 30, below at 40 and 50; it copies the givens
# on its own.
PIN_GIVENS = False


def load_solver(path=None):
    """`(model, tokenizer)` of a Sudoku model directory, the shipped one by default."""
    return load(DEFAULT_MODEL if path is None else path)


def puzzle_prompt(tokenizer, puzzle: str) -> str:
    """The chat-templated prompt asking for `puzzle` (81 characters, '.' or '0' blanks)."""
    messages = [{"role": "user", "content": sudoku.format_grid(normalize(puzzle))}]
    # Thinking off, stated explicitly: some tokenizer wrappers default it on.
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)


def normalize(puzzle: str) -> str:
    """81 characters of digits and '.', from a grid given in one line or nine."""
    cells = "".join(puzzle.split()).replace("0", sudoku.BLANK)
    if len(cells) != 81 or any(ch not in sudoku.DIGITS + sudoku.BLANK for ch in cells):
        raise UserError("a puzzle is 81 cells of digits 1-9 and '.' (or '0') for blanks, row by row")
    return cells


def given_pins(tokenizer, puzzle: str) -> dict[int, int]:
    """Output position -> token id of each given digit in the answer (nine rows of nine
    digits joined by newlines, so cell (r, c) is character 10 r + c), checked to be one
    token per character under this tokenizer."""
    cells = normalize(puzzle)
    # Any complete grid has the answer's layout; the givens' digits are what gets pinned.
    layout = sudoku.format_grid("".join(ch if ch in sudoku.DIGITS else "1" for ch in cells))
    ids = tokenizer.encode(layout, add_special_tokens=False)
    if len(ids) != len(layout) or tokenizer.decode(ids) != layout:
        raise UserError("this tokenizer does not write each grid character as one token; pin_givens needs that")
    digit = {d: tokenizer.encode(d, add_special_tokens=False) for d in sudoku.DIGITS}
    if any(len(v) != 1 for v in digit.values()):
        raise UserError("this tokenizer does not write each digit as one token; pin_givens needs that")
    return {(i // 9) * 10 + i % 9: digit[ch][0] for i, ch in enumerate(cells) if ch in sudoku.DIGITS}


def repair_pins(model, tokenizer, puzzle: str, answer: str, extra: int = 3) -> dict[int, int]:
    """Pins for a second try at a grid that breaks a rule: the givens and every filled
    cell except those in conflict and the `extra` blanks the model finds least likely in
    one bidirectional pass over the answer (`check`), which the model writes again."""
    from ...infill import check  # deferred: infill imports the generation loop too

    blanks = [i for i, ch in enumerate(puzzle) if ch not in sudoku.DIGITS]
    scores = check(model, tokenizer, sudoku.format_grid(answer), prompt=sudoku.format_grid(puzzle), chat=True)
    surprise = {t.start: t.surprise for t in scores.tokens}
    doubtful = sorted(blanks, key=lambda i: -surprise.get((i // 9) * 10 + i % 9, 0.0))[:extra]
    free = (conflicts(answer) & set(blanks)) | set(doubtful)
    kept = "".join(ch if i not in free else sudoku.BLANK for i, ch in enumerate(answer))
    return given_pins(tokenizer, kept)


def stream_solve(puzzle: str, model, tokenizer, pin_givens: bool = PIN_GIVENS,
                 **settings) -> Iterator[GenerationResponse]:
    """`stream_generate` on the puzzle's prompt: one response per denoising step. With
    `pin_givens` the given digits hold their answer positions from the first step."""
    if pin_givens:
        settings["pinned"] = given_pins(tokenizer, puzzle)
    return stream_generate(model, tokenizer, puzzle_prompt(tokenizer, puzzle), **settings)


def solve_puzzle(puzzle: str, model=None, tokenizer=None, pin_givens: bool = PIN_GIVENS,
                 repair_rounds: int = 0, **settings) -> str | None:
    """The model's completed grid (81 digits) for `puzzle`, or None if it did not
    answer with a grid. Loads the shipped model when none is given; `settings` are
    `GenerationSettings` overrides (defaults: the model's generation_config.json);
    `pin_givens` pins the given digits (see `stream_solve`). Each of `repair_rounds`
    re-solves a grid that breaks a rule with the cells it keeps pinned (`repair_pins`)."""
    if model is None:
        model, tokenizer = load_solver()
    text = "".join(r.text for r in stream_solve(puzzle, model, tokenizer, pin_givens, **settings))
    answer = sudoku.parse_grid(text)
    for _ in range(repair_rounds):
        if answer is None or not any(ch not in sudoku.DIGITS for ch in answer) and not conflicts(answer):
            break
        pins = repair_pins(model, tokenizer, puzzle, answer)
        prompt = puzzle_prompt(tokenizer, puzzle)
        text = "".join(r.text for r in stream_generate(model, tokenizer, prompt, pinned=pins, **settings))
        answer = sudoku.parse_grid(text) or answer
    return answer


def draft_cells(text: str) -> str:
    """81 cells read from a (possibly malformed) draft: row by row, `?` where a row has
    no digit."""
    rows = (text.split("\n") + [""] * 9)[:9]
    cells = ""
    for row in rows:
        row = (row + UNKNOWN * 9)[:9]
        cells += "".join(ch if ch in sudoku.DIGITS else UNKNOWN for ch in row)
    return cells


def render_grid(puzzle: str, cells: str, pinned: bool = False) -> Text:
    """A boxed grid: givens bold, the model's digits cyan, digits breaking a rule red.
    With `pinned` the givens are drawn from the puzzle (they are fixed from the first
    step) and underlined."""
    wrong = conflicts(cells)
    text = Text()
    for r in range(9):
        if r % 3 == 0:
            text.append("+-------+-------+-------+\n", style="dim")
        for c in range(9):
            if c % 3 == 0:
                text.append("| ", style="dim")
            i = r * 9 + c
            given = puzzle[i] in sudoku.DIGITS
            style = ("bold underline" if pinned else "bold") if given else ("red" if i in wrong else "cyan")
            text.append((puzzle[i] if given and pinned else cells[i]) + " ", style=style)
        text.append("|\n", style="dim")
    text.append("+-------+-------+-------+", style="dim")
    return text


def conflicts(cells: str) -> set[int]:
    """Cells whose digit repeats in their row, column or box."""
    bad = set()
    for i, ch in enumerate(cells):
        if ch in sudoku.DIGITS:
            bad |= {j for j in sudoku.PEERS[i] if cells[j] == ch}
    return bad


def status_line(r: GenerationResponse, pinned: bool = False) -> str:
    line = f"step {r.step} · {r.accepted} positions accepted · mean entropy {r.mean_entropy:.3f}"
    return line + (" · givens pinned" if pinned else "")


def show_solve(puzzle: str, model, tokenizer, console: Console, live: bool, pin_givens: bool = PIN_GIVENS,
               **settings) -> str | None:
    """Solve while drawing the canvas resolving (on a terminal); return the answer grid."""
    text, last = "", None
    with Live(console=console, auto_refresh=False) if live else nullcontext() as view:
        for last in stream_solve(puzzle, model, tokenizer, pin_givens, **settings):
            text += last.text
            if live:
                frame = Group(render_grid(puzzle, draft_cells(last.draft), pin_givens),
                              Text(status_line(last, pin_givens), style="dim"))
                view.update(frame, refresh=True)
    answer = sudoku.parse_grid(text)
    if not live:
        console.print(render_grid(puzzle, draft_cells(text), pin_givens))
    if last is not None:
        console.print(
            f"{last.steps_per_canvas:.0f} denoising steps, {last.tokens_per_forward:.1f} tokens per forward"
            + (", givens pinned" if pin_givens else ""),
            style="dim",
        )
    return answer
