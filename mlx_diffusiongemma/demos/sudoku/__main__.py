"""`python -m mlx_diffusiongemma.demos.sudoku [OPTIONS]` runs `mlx-diffusiongemma sudoku`."""

import sys

from ...cli import main

if __name__ == "__main__":
    main(["sudoku", *sys.argv[1:]])
