"""The README's first command, `pip install -e . && mlx-diffusiongemma sudoku`, from a fresh
virtual environment: the package is built and installed from the source tree without
network (its dependencies come from the system site-packages), and the console script
solves a puzzle with the model shipped inside the installed package."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, timeout=600):
    env = dict(os.environ, COLUMNS="100", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def test_quickstart_from_a_fresh_virtual_environment(tmp_path):
    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # A regular (not editable) install: the model must travel as package data.
    installed = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(ROOT)], tmp_path)
    assert installed.returncode == 0, installed.stderr
    where = run([str(python), "-c", "import mlx_diffusiongemma; print(mlx_diffusiongemma.__file__)"], tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    # The README command with its default difficulty; the seed fixes the puzzle.
    out = run([str(venv / "bin" / "mlx-diffusiongemma"), "sudoku", "--seed", "5"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "solved" in out.stdout and "not solved" not in out.stdout
