"""Seeded Sudoku puzzles for training and evaluating a small DiffusionGemma.

A grid is a string of 81 characters read row by row: digits ``'1'..'9'``, with
``'.'`` for blank cells in puzzles. Everything here is pure and deterministic:
the same seed always gives the same puzzles.
"""

from __future__ import annotations

import random

from ...errors import UserError

DIGITS = "123456789"
BLANK = "."
# Unique puzzles can have up to 64 blanks, but removing cells in random order
# almost never gets past about 60 before every further removal is ambiguous.
MAX_BLANKS = 60
# The solver's default difficulty: the shipped model solves 99.4% of puzzles at 30 blanks,
# 93.6% at 40 and 38.2% at 50.
DEFAULT_BLANKS = 30

_ALL = 0x1FF
_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_POPCOUNT = [bin(m).count("1") for m in range(512)]
_CANDIDATES = [[d for d in range(1, 10) if m >> (d - 1) & 1] for m in range(512)]
_UNITS = (
    [[r * 9 + c for c in range(9)] for r in range(9)]
    + [[r * 9 + c for r in range(9)] for c in range(9)]
    + [[b // 3 * 27 + b % 3 * 3 + r * 9 + c for r in range(3) for c in range(3)] for b in range(9)]
)
# The 20 cells that share a row, column or box with each cell.
PEERS = [
    sorted({j for unit in _UNITS if i in unit for j in unit} - {i}) for i in range(81)
]


class _Board:
    """Cell values plus row/column/box digit bitmasks for backtracking search."""

    def __init__(self, cells: list[int]) -> None:
        self.cells = cells
        self.rows = [0] * 9
        self.cols = [0] * 9
        self.boxes = [0] * 9
        self.empties = [i for i, v in enumerate(cells) if v == 0]
        self.valid = all(self._place_given(i, v) for i, v in enumerate(cells) if v)

    def _place_given(self, cell: int, digit: int) -> bool:
        bit = 1 << (digit - 1)
        if (self.rows[_ROW[cell]] | self.cols[_COL[cell]] | self.boxes[_BOX[cell]]) & bit:
            return False
        self.toggle(cell, bit)
        return True

    def toggle(self, cell: int, bit: int) -> None:
        """Flip ``bit`` in the cell's row, column and box masks."""
        self.rows[_ROW[cell]] ^= bit
        self.cols[_COL[cell]] ^= bit
        self.boxes[_BOX[cell]] ^= bit

    def options(self, cell: int) -> int:
        """Bitmask of digits that can go in ``cell``."""
        return ~(self.rows[_ROW[cell]] | self.cols[_COL[cell]] | self.boxes[_BOX[cell]]) & _ALL

    def most_constrained(self) -> tuple[int, int]:
        """Index into ``empties`` of the blank with the fewest options, and its options."""
        best, best_mask, best_count = 0, 0, 10
        for k, cell in enumerate(self.empties):
            mask = self.options(cell)
            count = _POPCOUNT[mask]
            if count < best_count:
                best, best_mask, best_count = k, mask, count
                if count <= 1:
                    break
        return best, best_mask

    def text(self) -> str:
        return "".join(DIGITS[v - 1] for v in self.cells)


def _search(board: _Board, found: list[str], limit: int, rng: random.Random | None) -> None:
    """Depth-first search filling blanks, most constrained cell first."""
    if not board.empties:
        found.append(board.text())
        return
    k, mask = board.most_constrained()
    if not mask:
        return
    cell = board.empties.pop(k)
    digits = list(_CANDIDATES[mask])
    if rng is not None:
        rng.shuffle(digits)
    for digit in digits:
        bit = 1 << (digit - 1)
        board.cells[cell] = digit
        board.toggle(cell, bit)
        _search(board, found, limit, rng)
        board.toggle(cell, bit)
        if len(found) >= limit:
            break
    board.cells[cell] = 0
    board.empties.insert(k, cell)


def _cells(grid: str) -> list[int]:
    """Grid string to cell values, 0 for blanks ('.' or '0')."""
    if len(grid) != 81:
        raise ValueError(f"a grid has 81 cells, got {len(grid)}")
    try:
        return [0 if ch in ".0" else DIGITS.index(ch) + 1 for ch in grid]
    except ValueError:
        raise ValueError(f"grid has characters other than digits and '.': {grid!r}") from None


def _solutions(cells: list[int], limit: int, rng: random.Random | None = None) -> list[str]:
    """Up to ``limit`` completions of ``cells`` (0 = blank); none if givens conflict."""
    board = _Board(list(cells))
    found: list[str] = []
    if board.valid and limit > 0:
        _search(board, found, limit, rng)
    return found


def solve(grid: str, limit: int = 2) -> list[str]:
    """Return up to ``limit`` solutions of ``grid`` (blanks as '.' or '0').

    Conflicting givens give ``[]``. Use ``limit=2`` to test uniqueness.
    """
    return _solutions(_cells(grid), limit)


def _random_solution(rng: random.Random) -> list[int]:
    """A random complete grid: search the empty grid trying digits in shuffled order."""
    return _cells(_solutions([0] * 81, 1, rng)[0])


def _ambiguous_without(cells: list[int], cell: int) -> bool:
    """Whether blanking ``cell`` lets another solution in.

    ``cells`` has a unique solution with ``cell`` filled, so any new solution must
    put a different digit there: try each alternative and look for one completion.
    """
    taken = 1 << (cells[cell] - 1)
    for peer in PEERS[cell]:
        if cells[peer]:
            taken |= 1 << (cells[peer] - 1)
    trial = list(cells)
    for other in _CANDIDATES[~taken & _ALL]:
        trial[cell] = other
        if _solutions(trial, 1):
            return True
    return False


def _carve(solution: list[int], blanks: int, rng: random.Random) -> str | None:
    """Blank cells in random order while the solution stays unique; None if stuck."""
    cells = list(solution)
    order = list(range(81))
    rng.shuffle(order)
    removed = 0
    for cell in order:
        if removed == blanks:
            break
        if not _ambiguous_without(cells, cell):
            cells[cell] = 0
            removed += 1
    if removed < blanks:
        return None
    return "".join(DIGITS[v - 1] if v else BLANK for v in cells)


def generate(
    rng: random.Random | int, blanks: int, max_attempts: int = 1000
) -> tuple[str, str]:
    """Return ``(puzzle, solution)``: a puzzle with exactly ``blanks`` blank cells and one solution.

    ``rng`` is a ``random.Random`` (advanced in place) or an integer seed. When the
    random removal order cannot reach ``blanks`` cells while keeping the solution
    unique, a fresh grid is drawn, up to ``max_attempts`` times.
    """
    if not 0 <= blanks <= MAX_BLANKS:
        raise UserError(f"blanks must be in 0..{MAX_BLANKS}, got {blanks}; choose fewer blanks")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    for _ in range(max_attempts):
        solution = _random_solution(rng)
        puzzle = _carve(solution, blanks, rng)
        if puzzle is not None:
            return puzzle, "".join(DIGITS[v - 1] for v in solution)
    raise RuntimeError(f"no unique puzzle with {blanks} blanks after {max_attempts} grids")


def make_dataset(seed: int, n: int, blanks: int | tuple[int, int]) -> list[tuple[str, str]]:
    """``n`` seeded ``(puzzle, solution)`` pairs.

    ``blanks`` is a fixed count or an inclusive ``(low, high)`` range drawn
    uniformly per puzzle.
    """
    low, high = (blanks, blanks) if isinstance(blanks, int) else blanks
    if low > high:
        raise ValueError(f"blank range is empty: {blanks}")
    rng = random.Random(seed)
    return [generate(rng, rng.randint(low, high)) for _ in range(n)]


def format_grid(grid: str) -> str:
    """Nine rows of nine characters joined by newlines (no trailing newline)."""
    _cells(grid)
    return "\n".join(grid[r * 9 : r * 9 + 9] for r in range(9))


def parse_grid(text: str) -> str | None:
    """Inverse of ``format_grid``; None unless ``text`` is a 9x9 grid of digits and '.'.

    Whitespace around the grid and at the ends of rows is ignored.
    """
    rows = [row.strip() for row in text.strip().splitlines()]
    if len(rows) != 9 or any(len(row) != 9 for row in rows):
        return None
    grid = "".join(rows)
    if any(ch not in DIGITS and ch != BLANK for ch in grid):
        return None
    return grid


def count_blanks(grid: str) -> int:
    """Number of blank (non-digit) cells in ``grid``."""
    return sum(ch not in DIGITS for ch in grid)


def _blank_cells(puzzle: str) -> list[int]:
    return [i for i, ch in enumerate(puzzle) if ch not in DIGITS]


def cell_accuracy(predicted: str | None, solution: str, puzzle: str) -> float:
    """Fraction of the puzzle's blank cells that ``predicted`` fills correctly.

    A missing or malformed prediction scores 0; a puzzle without blanks scores 1.
    """
    blanks = _blank_cells(puzzle)
    if not blanks:
        return 1.0
    if predicted is None or len(predicted) != 81:
        return 0.0
    return sum(predicted[i] == solution[i] for i in blanks) / len(blanks)


def _units_complete(grid: str) -> bool:
    """Every row, column and box holds each digit once."""
    return all({grid[i] for i in unit} == set(DIGITS) for unit in _UNITS)


def is_solved(predicted: str | None, puzzle: str) -> bool:
    """Whether ``predicted`` is a valid complete grid that keeps the puzzle's givens."""
    if predicted is None or len(predicted) != 81 or len(puzzle) != 81:
        return False
    keeps_givens = all(p == g for p, g in zip(predicted, puzzle) if g in DIGITS)
    return keeps_givens and _units_complete(predicted)

