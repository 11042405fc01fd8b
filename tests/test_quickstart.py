"""The README's first command, `pip install -e . && mlx-diffusiongemma sudoku`, from a fresh
virtual environment: the package is built and installed from the source tree without
network (its dependencies are borrowed from the environment running the tests), and the
console script solves a puzzle with the model shipped inside the installed package."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, timeout=600):
    env = dict(os.environ, COLUMNS="100", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def borrow_dependencies(python: Path) -> None:
    """Append this environment's import paths (whether it is a venv or not) to the new one's,
    after its own site-packages, so its own install of the package is the one imported.
    Entries of a .pth file do not run the .pth files inside them, so an editable install
    of the source tree here is not seen there."""
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], ROOT)
    paths = [p for p in sys.path if p and Path(p).is_dir() and not Path(p).resolve().is_relative_to(ROOT)]
    Path(purelib.stdout.strip(), "borrowed.pth").write_text("\n".join(paths) + "\n", encoding="utf-8")


def test_quickstart_from_a_fresh_virtual_environment(tmp_path):
    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    borrow_dependencies(python)
    # A regular (not editable) install: the model must travel as package data.
    installed = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(ROOT)], tmp_path)
    assert installed.returncode == 0, installed.stderr
    where = run([str(python), "-c", "import mlx_diffusiongemma; print(mlx_diffusiongemma.__file__)"], tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    # The README command with its default difficulty; the seed fixes the puzzle.
    out = run([str(venv / "bin" / "mlx-diffusiongemma"), "sudoku", "--seed", "5"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "solved" in out.stdout and "not solved" not in out.stdout
