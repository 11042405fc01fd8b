"""Demonstrations built on the public API, apart from the core: `sudoku`."""
