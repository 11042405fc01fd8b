"""The Sudoku demo: a small DiffusionGemma trained here (shipped in `model/`, 4-bit, no
download) that fills a grid in one canvas. `puzzles` makes and checks seeded puzzles,
`solver` prompts the model and draws the grid, `tokenizer` builds the demo's Gemma-4-style
tokenizer (also used by the tests)."""

from .puzzles import generate as generate_puzzle
from .solver import DEFAULT_MODEL, load_solver, solve_puzzle, stream_solve

__all__ = ["DEFAULT_MODEL", "generate_puzzle", "load_solver", "solve_puzzle", "stream_solve"]
