"""Sudoku accuracy and speed: the diffusion sampler vs one-position-per-forward decoding.

For each model and blank count, held-out puzzles (a seed the training script never
uses) are solved with the default sampler settings (the model's generation_config.json):
share solved, cell accuracy on the blanks, steps per canvas, tokens per forward, wall
time. The sequential baseline runs the same model left to right: the canvas starts as
noise and each forward commits the argmax of the next position only (its logits, at
the sampler's last temperature, self-condition the next forward). With --pin-givens the
diffusion runs pin each puzzle's given digits at their answer positions.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
    python benchmarks/sudoku_eval.py --n 500 --sequential 200 --dequantize \\
        --model unquantized=runs/sudoku/hf --model 4-bit=mlx_diffusiongemma/demos/sudoku/model

(benchmarks/README.md splits this into parallel runs; the sequential baseline and the
timing use the first model only.)
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import dequantize_model

from mlx_diffusiongemma.demos.sudoku import puzzles as sudoku
from mlx_diffusiongemma.demos.sudoku.solver import (
    DEFAULT_MODEL,
    conflicts,
    given_pins,
    repair_pins,
    puzzle_prompt,
    stream_solve,
)
from mlx_diffusiongemma.generate import (
    REFERENCE_DEFAULTS,
    GenerationSettings,
    encode_text,
    generate_step,
)
from mlx_diffusiongemma.loading import load
from mlx_diffusiongemma.sample import pad_after_eos

EVAL_SEED = 7_000_000
# Sampler settings are chosen on other puzzles than the ones they are reported on.
TUNING_SEED = 5_000_000


def puzzles(blanks: int, n: int, tuning: bool = False) -> list[tuple[str, str]]:
    return sudoku.make_dataset((TUNING_SEED if tuning else EVAL_SEED) + blanks, n, blanks)


def _flag(value: str) -> bool:
    return {"true": True, "false": False}[value.lower()]


# The sampler settings --set may override, with the type each takes.
SETTABLE = {**{k: type(v) for k, v in REFERENCE_DEFAULTS.items()},
            "sampler": str, "threshold": float, "self_conditioning_top_k": int,
            "fast": _flag, "full_canvas": _flag, "min_canvas_length": int}


def parse_setting(text: str) -> tuple[str, object]:
    """`KEY=VALUE` for a sampler setting, e.g. `entropy_bound=0.3` or `sampler=confidence`."""
    key, _, value = text.partition("=")
    if key not in SETTABLE:
        raise argparse.ArgumentTypeError(f"{key!r} is not one of {', '.join(SETTABLE)}")
    try:
        return key, SETTABLE[key](value)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{key} takes a {SETTABLE[key].__name__}, got {value!r}") from None


def diffusion(model, tokenizer, puzzle: str, seed: int, pin_givens: bool = False) -> dict:
    """One puzzle through the default sampler."""
    tic = time.perf_counter()
    text, last = "", None
    for last in stream_solve(puzzle, model, tokenizer, pin_givens, seed=seed):
        text += last.text
    return dict(
        answer=sudoku.parse_grid(text), seconds=time.perf_counter() - tic, forwards=last.decoder_forwards,
        steps=last.steps_per_canvas, tokens_per_forward=last.tokens_per_forward,
    )


def sequential(model, tokenizer, puzzle: str, seed: int) -> dict:
    """One puzzle decoded one canvas position per forward, left to right."""
    tic = time.perf_counter()
    s = GenerationSettings.resolve(model, seed=seed)
    cache = model.make_cache()
    model.encode(mx.array(prompt_batch(tokenizer, [(puzzle, None)])), cache)
    L, V = model.args.canvas_length, model.args.vocab_size
    canvas = mx.random.randint(0, V, (1, L), dtype=mx.int32, key=mx.random.key(seed))
    scaled, tokens = None, []
    for j in range(L):
        logits = model.denoise(canvas, cache, scaled)
        scaled = logits / s.t_min
        token = mx.argmax(logits[0, j]).astype(mx.int32)
        canvas[0, j] = token
        tokens.append(token.item())
        if tokens[-1] in s.eos_token_ids:
            break
    visible = [t for t in tokens if t not in s.eos_token_ids]
    return dict(
        answer=sudoku.parse_grid(tokenizer.decode(visible)), seconds=time.perf_counter() - tic,
        forwards=len(tokens), steps=len(tokens), tokens_per_forward=1.0,
    )


def batched_diffusion(model, tokenizer, cases: list[tuple[str, str]], seed: int, pin_givens: bool = False,
                      repair_rounds: int = 0, **settings) -> list[dict]:
    """`generate_step` on a batch of puzzles (same prompt length): each row stops on its own
    stable-and-confident rule and keeps the canvas it stopped on. `pin_givens` pins each
    row's givens (one mapping per row); each of `repair_rounds` re-solves, as one batch,
    the grids that break a rule with the cells `repair_pins` keeps pinned."""
    pinned = [given_pins(tokenizer, p) for p, _ in cases] if pin_givens else None
    results = denoise_batch(model, tokenizer, cases, seed, pinned, settings)
    for r in range(repair_rounds):
        todo = [i for i, res in enumerate(results) if needs_repair(res["answer"])]
        if not todo:
            break
        pins = [repair_pins(model, tokenizer, cases[i][0], results[i]["answer"]) for i in todo]
        again = denoise_batch(model, tokenizer, [cases[i] for i in todo], seed + 1 + r, pins, settings)
        for i, new in zip(todo, again):
            forwards = results[i]["forwards"] + new["forwards"]
            answer = new["answer"] or results[i]["answer"]
            results[i] = dict(answer=answer, forwards=forwards, steps=forwards,
                              tokens_per_forward=results[i]["tokens_per_forward"] * results[i]["forwards"] / forwards)
    return results


def needs_repair(answer: str | None) -> bool:
    return answer is not None and bool(conflicts(answer))


def denoise_batch(model, tokenizer, cases, seed: int, pinned, settings: dict) -> list[dict]:
    s = GenerationSettings.resolve(model, seed=seed, **settings, **({"pinned": pinned} if pinned else {}))
    for event in generate_step(model, prompt_batch(tokenizer, cases), settings=s):
        if event.committed is not None:
            return [score_tokens(tokenizer, s, row, n) for row, n in zip(event.committed, event.step)]


def batched_sequential(model, tokenizer, cases: list[tuple[str, str]], seed: int) -> list[dict]:
    """`sequential` on a batch of puzzles: forward j commits position j of every row."""
    s = GenerationSettings.resolve(model, seed=seed)
    cache = prefill(model, tokenizer, cases)
    B, L, V = len(cases), model.args.canvas_length, model.args.vocab_size
    canvas = mx.random.randint(0, V, (B, L), dtype=mx.int32, key=mx.random.key(seed))
    scaled, eos = None, mx.array(list(s.eos_token_ids))
    ended = mx.zeros((B,), dtype=mx.bool_)
    for j in range(L):
        logits = model.denoise(canvas, cache, scaled)
        scaled = logits / s.t_min
        token = mx.argmax(logits[:, j], axis=-1).astype(mx.int32)
        canvas[:, j] = token
        ended = ended | (token[:, None] == eos).any(axis=-1)
        if ended.all().item():
            break
    results = []
    for row in canvas.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in s.eos_token_ids), L)
        results.append(score_tokens(tokenizer, s, row, n, sequential=True))
    return results


def prompt_batch(tokenizer, cases: list[tuple[str, str]]) -> list[list[int]]:
    return [encode_text(tokenizer, puzzle_prompt(tokenizer, p)) for p, _ in cases]


def prefill(model, tokenizer, cases: list[tuple[str, str]]) -> list:
    cache = model.make_cache()
    model.encode(mx.array(prompt_batch(tokenizer, cases)), cache)
    return cache


def score_tokens(tokenizer, s: GenerationSettings, row: list[int], forwards: int, sequential: bool = False) -> dict:
    """Answer grid, forwards and tokens per forward of one committed canvas."""
    tokens, _ = pad_after_eos(row, set(s.eos_token_ids), 0)
    visible = []
    for t in tokens:
        if t in s.eos_token_ids:
            break
        visible.append(t)
    generated = sum(t != 0 for t in tokens)
    text = tokenizer.decode(visible)
    return dict(
        answer=sudoku.parse_grid(text), text=text, forwards=forwards, steps=forwards,
        tokens_per_forward=1.0 if sequential else generated / forwards,
    )


def first_rows(text: str, rows: int) -> str | None:
    """The first `rows` rows of a grid's text (nine cells each), joined; None if malformed."""
    lines = [line.strip() for line in text.strip().splitlines()][:rows]
    if len(lines) != rows or any(len(x) != 9 or not x.isdigit() for x in lines):
        return None
    return "".join(lines)


def score(r: dict, puzzle: str, solution: str, rows: int) -> None:
    """Solved and cell accuracy of a whole grid, or with `rows` < 9 of its first rows: those
    rows equal the (unique) solution's, and the share of their blanks filled right."""
    if rows == 9:
        r["solved"] = sudoku.is_solved(r["answer"], puzzle)
        r["cell_accuracy"] = sudoku.cell_accuracy(r["answer"], solution, puzzle)
        return
    r["answer"] = first_rows(r.get("text", ""), rows)
    blanks = [i for i in range(9 * rows) if puzzle[i] not in sudoku.DIGITS]
    r["solved"] = r["answer"] == solution[: 9 * rows]
    right = sum(r["answer"] is not None and r["answer"][i] == solution[i] for i in blanks)
    r["cell_accuracy"] = right / len(blanks) if blanks else 1.0


def accuracy(method, model, tokenizer, cases: list[tuple[str, str]], batch: int, rows: int = 9,
             **settings) -> dict:
    """Mean scores of a batched `method` over `(puzzle, solution)` cases (of the first
    `rows` rows of each grid)."""
    runs = []
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        for r, (puzzle, solution) in zip(method(model, tokenizer, chunk, seed=start, **settings), chunk):
            score(r, puzzle, solution, rows)
            r.pop("text", None)
            runs.append(r)
    summary = mean(runs, ("solved", "cell_accuracy", "steps", "tokens_per_forward", "forwards"))
    # Per puzzle, so runs over different numbers of the same puzzles can be compared.
    return {**summary, "solved_each": [bool(r["solved"]) for r in runs], "answer_each": [r["answer"] for r in runs]}


def timing(method, model, tokenizer, cases: list[tuple[str, str]], **options) -> dict:
    """Batch-1 wall time per puzzle through the package's own generation path."""
    runs = []
    for i, (puzzle, _) in enumerate(cases):
        runs.append(method(model, tokenizer, puzzle, seed=i, **options))
    return mean(runs, ("seconds", "forwards"))


def mean(runs: list[dict], keys) -> dict:
    return {"n": len(runs), **{k: sum(float(r[k]) for r in runs) / len(runs) for k in keys}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None,
                        help="NAME=PATH (repeatable; default: the shipped model)")
    parser.add_argument("--blanks", type=int, nargs="+", default=[30, 40, 50])
    parser.add_argument("--n", type=int, default=500, help="puzzles per blank count")
    parser.add_argument("--batch", type=int, default=50, help="puzzles per batch for the accuracy runs")
    parser.add_argument("--sequential", type=int, default=500,
                        help="puzzles per blank count for the sequential baseline (first model only)")
    parser.add_argument("--timed", type=int, default=10,
                        help="puzzles per blank count timed one at a time (first model only)")
    parser.add_argument("--dequantize", action="store_true",
                        help="run quantized models on their dequantized weights (same values in float32; "
                             "MLX's CPU quantized matmul is several times slower)")
    parser.add_argument("--tuning", action="store_true",
                        help="use the tuning puzzles (another seed) instead of the evaluation's")
    parser.add_argument("--set", dest="settings", action="append", default=[], type=parse_setting,
                        metavar="KEY=VALUE", help="override a sampler setting of the diffusion accuracy runs (repeatable)")
    parser.add_argument("--pin-givens", action="store_true",
                        help="pin each puzzle's given digits at their answer positions in the diffusion runs")
    parser.add_argument("--repair-rounds", type=int, default=0,
                        help="re-solve grids that break a rule, keeping their other cells pinned (rounds)")
    parser.add_argument("--rows", type=int, default=9, choices=range(1, 10), metavar="{1..9}",
                        help="ask for the first ROWS rows only (max_tokens = 10 ROWS - 1) and score those")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sudoku.json"))
    return parser.parse_args()


def accuracy_row(name: str, method: str, blanks: int, r: dict) -> str:
    return (
        f"| {name} | {method} | {blanks} | {r['n']} | {100 * r['solved']:.1f}% | {100 * r['cell_accuracy']:.1f}% "
        f"| {r['steps']:.1f} | {r['tokens_per_forward']:.2f} |"
    )


def timing_row(name: str, blanks: int, d: dict, q: dict) -> str:
    return (
        f"| {name} | {blanks} | {d['n']} | {d['forwards']:.1f} | {1000 * d['seconds']:.0f} "
        f"| {q['forwards']:.1f} | {1000 * q['seconds']:.0f} | {q['seconds'] / d['seconds']:.1f}x |"
    )


def run_model(k: int, name: str, path: str, args) -> list[dict]:
    model, tokenizer = load(path)
    if args.dequantize:
        model = dequantize_model(model)
    results = []
    for blanks in args.blanks:
        cases = puzzles(blanks, max(args.n, args.sequential, args.timed), args.tuning)
        pins = dict(pin_givens=True) if args.pin_givens else {}
        method = "diffusion, givens pinned" if args.pin_givens else "diffusion"
        if args.repair_rounds:
            pins["repair_rounds"] = args.repair_rounds
            method += f", {args.repair_rounds} repair rounds"
        rows = {} if args.rows == 9 else dict(rows=args.rows, max_tokens=10 * args.rows - 1)
        jobs = [(method, batched_diffusion, args.n, {**rows, **dict(args.settings), **pins})]
        if k == 0 and args.rows == 9:
            jobs.append(("sequential", batched_sequential, args.sequential, {}))
        for method, fn, n, settings in jobs:
            if n:
                r = accuracy(fn, model, tokenizer, cases[:n], args.batch, **settings)
                results.append(dict(model=name, path=path, decoding=method, blanks=blanks, settings=settings, **r))
                print(accuracy_row(name, method, blanks, r), flush=True)
        if k == 0 and args.timed and args.rows == 9:
            d = timing(diffusion, model, tokenizer, cases[: args.timed], pin_givens=args.pin_givens)
            q = timing(sequential, model, tokenizer, cases[: args.timed])
            results.append(dict(model=name, path=path, decoding="timed", blanks=blanks, diffusion=d, sequential=q))
            print(timing_row(name, blanks, d, q), flush=True)
    return results


def main():
    args = parse_args()
    models = [m.split("=", 1) for m in args.model] if args.model else [["4-bit", str(DEFAULT_MODEL)]]
    print("| model | decoding | blanks | puzzles | solved | cell accuracy | steps/canvas | tokens/forward |")
    print("|---|---|---|---|---|---|---|---|")
    print("(timing rows: | model | blanks | puzzles | diffusion forwards | diffusion ms | sequential forwards "
          "| sequential ms | slowdown |)")
    results = []
    for k, (name, path) in enumerate(models):
        results += run_model(k, name, path, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
