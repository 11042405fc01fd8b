"""The `mlx-diffusiongemma` command line, a thin shell over the Python API: one module per
command (`generate`, `chat`, `convert`, `infill`, `check`, `lora`, `fuse`, `serve`, `sudoku`), options
named after `GenerationSettings` and `convert` (`options`), and one-line errors for every
mistake a user can fix (`app`).
"""

from . import chat, check, convert, fuse, generate, infill, lora, serve, sudoku  # noqa: F401  (each registers its command)
from .app import app


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mlx-diffusiongemma` script (`argv` defaults to sys.argv[1:])."""
    app(args=argv, prog_name="mlx-diffusiongemma")


__all__ = ["app", "main"]
