"""A screenshot of the chat page mid-canvas on the shipped Sudoku model: the served page
in headless Chromium (tests/test_chat_page.py's driver) showing a grid resolving.

    python benchmarks/chat_page_screenshot.py --out benchmarks/results/chat_page_resolving.png
"""

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_fixtures import ServerProcess  # noqa: E402
from test_chat_page import chat_in_page, launch_chromium  # noqa: E402

from mlx_diffusiongemma.demos.sudoku import puzzles  # noqa: E402

MODEL = ROOT / "mlx_diffusiongemma" / "demos" / "sudoku" / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--after-drafts", type=int, default=6, help="take the shot after this many drafts")
    args = parser.parse_args()
    puzzle, _ = puzzles.generate(3, 40)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(MODEL, Path(tmp) / "server.log")
        browser, ws_url = launch_chromium(Path(tmp))
        try:
            seen = asyncio.run(chat_in_page(ws_url, server.base, args.out, prompt=puzzles.format_grid(puzzle),
                                            max_tokens=90, steps=32, drafts_before_shot=args.after_drafts))
        finally:
            browser.terminate()
            server.stop()
    print(f"{len(seen['drafts'])} drafts; final text:\n{seen['text']}\nscreenshot: {args.out}")


if __name__ == "__main__":
    main()
