"""Seeded Sudoku generation, solving, text formats and scoring."""

from __future__ import annotations

import random

import pytest

from mlx_diffusiongemma.demos.sudoku.puzzles import (
    cell_accuracy,
    count_blanks,
    format_grid,
    generate,
    is_solved,
    make_dataset,
    parse_grid,
    solve,
)

SOLUTION = (
    "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
)
PUZZLE = (
    "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
)


def test_solve_classic_puzzle() -> None:
    assert solve(PUZZLE) == [SOLUTION]
    assert solve(PUZZLE.replace(".", "0")) == [SOLUTION]


def test_solve_reports_multiple_and_no_solutions() -> None:
    assert len(solve("." * 81, limit=3)) == 3
    conflicting = "11" + "." * 79
    assert solve(conflicting) == []
    with pytest.raises(ValueError):
        solve("123")


@pytest.mark.parametrize("blanks", [0, 1, 30, 45, 55])
def test_generated_puzzles_are_unique_with_exact_blanks(blanks: int) -> None:
    rng = random.Random(blanks)
    for _ in range(5):
        puzzle, solution = generate(rng, blanks)
        assert count_blanks(puzzle) == blanks
        assert solve(puzzle, limit=2) == [solution]
        assert is_solved(solution, puzzle)


def test_seeds_reproduce_and_differ() -> None:
    first = make_dataset(seed=7, n=5, blanks=40)
    assert first == make_dataset(seed=7, n=5, blanks=40)
    assert first != make_dataset(seed=8, n=5, blanks=40)
    assert generate(3, 40) == generate(random.Random(3), 40)


def test_dataset_blank_range() -> None:
    pairs = make_dataset(seed=1, n=30, blanks=(20, 24))
    counts = {count_blanks(puzzle) for puzzle, _ in pairs}
    assert counts <= set(range(20, 25)) and len(counts) > 1
    with pytest.raises(ValueError):
        make_dataset(seed=1, n=1, blanks=(5, 4))
    with pytest.raises(ValueError):
        generate(0, 70)


def test_format_parse_round_trip() -> None:
    text = format_grid(PUZZLE)
    assert text.splitlines()[0] == "53..7...."
    assert len(text.splitlines()) == 9 and not text.endswith("\n")
    assert parse_grid(text) == PUZZLE
    assert parse_grid(f"\n  {text}  \n\n") == PUZZLE
    assert parse_grid(text.replace("\n", " \r\n")) == PUZZLE


@pytest.mark.parametrize(
    "text",
    ["", "123", "\n".join(["123456789"] * 8), "\n".join(["12345678x"] * 9), "\n".join(["1234567890"] * 9)],
)
def test_parse_rejects_non_grids(text: str) -> None:
    assert parse_grid(text) is None


def test_is_solved_rejects_bad_grids() -> None:
    assert is_solved(SOLUTION, PUZZLE)
    swapped = SOLUTION[1] + SOLUTION[0] + SOLUTION[2:]
    assert not is_solved(swapped, PUZZLE.replace("53", ".."))  # breaks columns
    relabeled = SOLUTION.translate(str.maketrans("12", "21"))
    assert is_solved(relabeled, "." * 81)
    assert not is_solved(relabeled, PUZZLE)  # valid grid, but contradicts givens
    assert not is_solved(PUZZLE, PUZZLE)
    assert not is_solved(None, PUZZLE)


def test_cell_accuracy_counts_only_blanks() -> None:
    assert cell_accuracy(SOLUTION, SOLUTION, PUZZLE) == 1.0
    blanks = [i for i, ch in enumerate(PUZZLE) if ch == "."]
    wrong = list(SOLUTION)
    for i in blanks[:17]:
        wrong[i] = "0"
    assert cell_accuracy("".join(wrong), SOLUTION, PUZZLE) == pytest.approx(1 - 17 / len(blanks))
    assert cell_accuracy(PUZZLE, SOLUTION, PUZZLE) == 0.0
    assert cell_accuracy(None, SOLUTION, PUZZLE) == 0.0
    assert cell_accuracy("", SOLUTION, SOLUTION) == 1.0
