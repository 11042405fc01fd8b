"""The README's quickstart: `mlx-diffusiongemma sudoku` with the shipped model."""

from typer.testing import CliRunner

from mlx_diffusiongemma.cli import app


def test_sudoku_command_solves_a_puzzle_with_the_shipped_model():
    result = CliRunner().invoke(app, ["sudoku", "--blanks", "30", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("solved") and "not solved" not in result.output


def test_sudoku_command_rejects_a_bad_puzzle_in_one_line():
    result = CliRunner().invoke(app, ["sudoku", "--puzzle", "12"])
    assert result.exit_code != 0
    assert "error:" in result.output and "Traceback" not in result.output


def test_sudoku_command_pins_the_givens_when_asked():
    result = CliRunner().invoke(app, ["sudoku", "--blanks", "30", "--seed", "5", "--pin-givens"])
    assert result.exit_code == 0, result.output
    assert "givens pinned" in result.output and result.output.rstrip().endswith("solved")
    assert "givens pinned" not in CliRunner().invoke(app, ["sudoku", "--blanks", "30", "--seed", "5"]).output
