"""`mlx-diffusiongemma sudoku`: the offline demo, a small DiffusionGemma solving a grid."""

import random
from typing import Annotated

import typer
from rich.console import Console

from ..demos.sudoku import puzzles
from ..demos.sudoku.solver import PIN_GIVENS
from ..errors import UserError
from .app import app
from .options import seed_option


def _blanks(value: int) -> int:
    if not 0 <= value <= puzzles.MAX_BLANKS:
        raise typer.BadParameter(f"{value} is not a number of blanks from 0 to {puzzles.MAX_BLANKS}.")
    return value


@app.command()
def sudoku(
    puzzle: Annotated[str | None, typer.Option(
        help="81 cells row by row, '.' or '0' for blanks.", show_default="a generated one")] = None,
    blanks: Annotated[int, typer.Option(
        callback=_blanks, help=f"Blanks in a generated puzzle, 0 to {puzzles.MAX_BLANKS} "
             "(the shipped model solves 99% at 30, 94% at 40, 38% at 50).")] = puzzles.DEFAULT_BLANKS,
    seed: Annotated[int | None, typer.Option(help="Seed of the generated puzzle.", show_default="random")] = None,
    sampler_seed: Annotated[int, typer.Option(
        callback=seed_option, help="Seed of the denoising sampler, 0 to 2**64-1.")] = 0,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="A Sudoku model directory.", show_default="the one shipped in the package")] = None,
    pin_givens: Annotated[bool, typer.Option(
        help="Hold the given digits at their answer positions from the first step "
             "(pinned canvas positions) instead of letting the model copy them.")] = PIN_GIVENS,
):
    """Solve a Sudoku with the small DiffusionGemma shipped in the package, watching the grid resolve.

    Exits 0 when the grid is solved, 1 when the model's answer is wrong.
    """
    from ..chat import check_chat_template
    from ..demos.sudoku.solver import load_solver, normalize, show_solve  # deferred: --help stays fast

    console = Console(highlight=False)
    if puzzle is not None:
        grid = normalize(puzzle)
    else:
        seed = random.randrange(2**31) if seed is None else seed
        grid, _ = puzzles.generate(seed, blanks)
        console.print(f"puzzle: {blanks} blanks, seed {seed}", style="dim")
    if not puzzles.solve(grid, limit=1):
        raise UserError("this puzzle has no solution (its givens conflict); check the puzzle")
    model, tokenizer = load_solver(model)
    check_chat_template(tokenizer)  # the puzzle is a chat turn
    answer = show_solve(grid, model, tokenizer, console, console.is_terminal, pin_givens, seed=sampler_seed)
    solved = puzzles.is_solved(answer, grid)
    console.print("solved" if solved else "not solved", style="bold green" if solved else "bold red")
    if not solved:
        raise typer.Exit(1)
