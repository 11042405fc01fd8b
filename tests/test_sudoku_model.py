import os
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from mlx_diffusiongemma.demos.sudoku import puzzles as sudoku
from mlx_diffusiongemma.demos.sudoku.solver import DEFAULT_MODEL, load_solver, normalize, solve_puzzle

# Held out: the training script draws its puzzles from seed 1. The shipped model solves
# 99.4% of 30-blank puzzles (benchmarks/README.md); all 8 of these.
HELD_OUT = sudoku.make_dataset(seed=424242, n=8, blanks=30)
PASS = 0.75


@pytest.fixture(scope="module")
def shipped():
    return load_solver()


def solved_share(model, tokenizer) -> float:
    solved = [sudoku.is_solved(solve_puzzle(p, model, tokenizer, seed=i), p) for i, (p, _) in enumerate(HELD_OUT)]
    return sum(solved) / len(solved)


def randomized(a: mx.array) -> mx.array:
    """A random array like `a`: random bits for packed quantized weights, else values
    with the same mean and spread."""
    if a.dtype == mx.uint32:
        return mx.random.randint(0, 2**31 - 1, a.shape).astype(mx.uint32)
    return (mx.random.normal(a.shape) * a.std() + a.mean()).astype(a.dtype)


def test_shipped_model_is_small_and_quantized(shipped):
    model, _ = shipped
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size < 8e6
    assert "scales" in model.layers[0].experts.gate_up_proj


def test_shipped_model_solves_held_out_puzzles(shipped):
    assert solved_share(*shipped) >= PASS


def test_random_weights_fail_the_same_check(shipped):
    model, tokenizer = shipped
    original = model.parameters()
    mx.random.seed(0)
    try:
        model.update(tree_map(randomized, original))
        assert solved_share(model, tokenizer) < PASS
    finally:
        model.update(original)


def test_answers_keep_the_givens(shipped):
    puzzle, solution = HELD_OUT[0]
    answer = solve_puzzle(puzzle, *shipped, seed=0)
    assert sudoku.cell_accuracy(answer, solution, puzzle) > 0.9
    assert all(a == g for a, g in zip(answer, puzzle) if g != ".")


def test_normalize_accepts_zeros_and_rows():
    puzzle = HELD_OUT[0][0]
    assert normalize(sudoku.format_grid(puzzle).replace(".", "0")) == puzzle


def test_quickstart_command():
    env = dict(os.environ, COLUMNS="100")
    out = subprocess.run(
        [sys.executable, "-m", "mlx_diffusiongemma.demos.sudoku", "--blanks", "30", "--seed", "5"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "solved" in out.stdout and "not solved" not in out.stdout


@pytest.mark.parametrize("args,fragment", [
    (["--blanks", "70"], "70"),
    (["--blanks", "-1"], "-1"),
    (["--puzzle", "12"], "81 cells"),
])
def test_module_entry_point_bad_options_are_one_line(args, fragment):
    out = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma.demos.sudoku", *args],
                         capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert fragment in lines[0] and ("blanks" in lines[0] or "81 cells" in lines[0])
