import sys
from pathlib import Path

# Tests share small helpers (tests/reference.py) that build checkpoints with the reference.
sys.path.insert(0, str(Path(__file__).parent))
