"""What the benchmark scripts share: where the released checkpoint's metadata lives."""

from pathlib import Path

# Byte-exact copies of the release's config.json, generation_config.json and index, plus
# the inferred tensor shapes (tests/data/README.md).
RELEASE = Path(__file__).resolve().parents[1] / "tests" / "data" / "diffusiongemma-26B-A4B-it"
