"""Why pinned tokens enter a canvas after its first forward: each puzzle solved from many
draws on the shipped Sudoku model, three ways, counted per puzzle.

- free: nothing pinned;
- pinned: the givens pinned, as the package pins (the first forward reads the starting
  canvas, the pins enter with the first renoising);
- pinned from the first forward: the same, with the starting canvas already holding the
  givens (`initial_canvas`), so the first forward sees them too.

Each of `--copies` runs of a puzzle has its own seed and noise canvas, the same for the
three ways. The default sampler settings throughout.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/pinned_first_forward.py --blanks 30 --puzzles 12 116 326 362 421 0 1 2 --copies 16
"""

import argparse
import json

import mlx.core as mx
from mlx_lm.utils import dequantize_model

from mlx_diffusiongemma import GenerationSettings, generate_step, load
from mlx_diffusiongemma.demos.sudoku import puzzles as sudoku
from mlx_diffusiongemma.demos.sudoku.solver import DEFAULT_MODEL, given_pins
from sudoku_eval import prompt_batch, puzzles, score_tokens

WAYS = ("free", "pinned", "pinned from the first forward")


def noise_start(model, pins: dict[int, int], seed: int, with_pins: bool) -> tuple[int, ...]:
    L, V = model.args.canvas_length, model.args.vocab_size
    noise = mx.random.randint(0, V, (L,), dtype=mx.int32, key=mx.random.key(seed)).tolist()
    return tuple(pins.get(p, t) if with_pins else t for p, t in enumerate(noise))


def solved(model, tokenizer, case: tuple[str, str], seed: int, way: str) -> bool:
    puzzle, _ = case
    pins = given_pins(tokenizer, puzzle)
    extra = {} if way == "free" else {"pinned": pins}
    start = noise_start(model, pins, seed, way == WAYS[2])
    s = GenerationSettings.resolve(model, seed=seed, initial_canvas=start, **extra)
    for event in generate_step(model, prompt_batch(tokenizer, [case]), settings=s):
        if event.committed is not None:
            answer = score_tokens(tokenizer, s, event.committed[0], event.step[0])["answer"]
            return sudoku.is_solved(answer, puzzle)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blanks", type=int, default=30)
    parser.add_argument("--puzzles", type=int, nargs="+", required=True, help="indices among the evaluation's")
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--out", help="also write the counts as JSON here")
    args = parser.parse_args()
    model, tokenizer = load(DEFAULT_MODEL)
    model = dequantize_model(model)
    cases = puzzles(args.blanks, max(args.puzzles) + 1)
    print(f"| puzzle ({args.blanks} blanks) | " + " | ".join(f"{w}: solved of {args.copies}" for w in WAYS) + " |")
    print("|---" * (len(WAYS) + 1) + "|")
    counts = {}
    for i in args.puzzles:
        counts[i] = {w: sum(solved(model, tokenizer, cases[i], 1000 * i + k, w) for k in range(args.copies))
                     for w in WAYS}
        print(f"| {i} | " + " | ".join(str(counts[i][w]) for w in WAYS) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"blanks": args.blanks, "copies": args.copies, "counts": counts}, f, indent=1)


if __name__ == "__main__":
    main()
