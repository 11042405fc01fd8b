"""Step by step, how the entropy budget is spent on the shipped Sudoku model, decoding
freely and with the givens pinned: the givens' summed entropy, the blanks accepted and how
many of those hold a wrong digit, and the blanks' mean entropy (means over the rows).

The loop is `steps.denoise_canvas`'s arithmetic (the package's `capped_sampler_step` on the
model's raw head logits, the same key chain shape) with the per-position entropies and
accepted mask kept, which the public loop reduces to counts; it runs every step to the
cap (no stop test), since the question is what each step accepts. The pins enter the
canvas after its first forward, as the package does; `--first-forward-pinned` puts them in
the first forward too (the rule the table in benchmarks/README.md was recorded with).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/pinned_budget_trace.py --blanks 30 --n 32 --first-forward-pinned
"""

import argparse

import mlx.core as mx
import numpy as np
from mlx_lm.utils import dequantize_model

from mlx_diffusiongemma import GenerationSettings, load
from mlx_diffusiongemma.demos.sudoku import puzzles as sudoku
from mlx_diffusiongemma.demos.sudoku.solver import DEFAULT_MODEL, given_pins
from mlx_diffusiongemma.sample import capped_sampler_step, temperature
from sudoku_eval import prompt_batch, puzzles


def layout(tokenizer, cases, L: int):
    """(B, L) masks of the givens and of the blank cells, the givens' ids and the solutions' ids."""
    B = len(cases)
    given, given_ids, solution = np.zeros((B, L), bool), np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
    for i, (puzzle, answer) in enumerate(cases):
        for pos, t in given_pins(tokenizer, puzzle).items():
            given[i, pos], given_ids[i, pos] = True, t
        ids = tokenizer.encode(sudoku.format_grid(answer), add_special_tokens=False)
        solution[i, : len(ids)] = ids
    cell = (np.arange(L) % 10 != 9) & (np.arange(L) < 89)
    return given, ~given & cell[None], given_ids, solution


def trace(model, tokenizer, cases, pinned: bool, seed: int, first_forward_pinned: bool = False) -> list[dict]:
    s = GenerationSettings.resolve(model, seed=seed)
    B, L, V = len(cases), model.args.canvas_length, model.args.vocab_size
    given, blank, given_ids, solution = layout(tokenizer, cases, L)
    cache = model.make_cache()
    model.encode(mx.array(prompt_batch(tokenizer, cases)), cache)
    key, noise_key = mx.random.split(mx.random.key(seed))
    canvas = mx.random.randint(0, V, (B, L), dtype=mx.int32, key=noise_key)
    mask = mx.array(given) if pinned else mx.zeros((B, L), dtype=mx.bool_)
    cap, bias, bound = (mx.array(v, dtype=mx.float32) for v in (model.args.final_logit_softcapping, 0.0,
                                                                  s.entropy_bound))
    scaled = probs = None
    rows = []
    for n, cur in enumerate(range(s.max_denoising_steps, 0, -1), start=1):
        if pinned and (n > 1 or first_forward_pinned):
            canvas = mx.where(mask, mx.array(given_ids), canvas)
        raw = model.denoise(canvas, cache, scaled, self_conditioning_probs=probs, capped=False)
        inv_t = mx.array(1 / temperature(cur, s.max_denoising_steps, s.t_min, s.t_max), dtype=mx.float32)
        key, step_key = mx.random.split(key)
        scaled, probs, _, canvas, accepted, entropy = capped_sampler_step(
            raw, cap, bias, inv_t, bound, mx.random.split(step_key), mask)
        h, a, c = np.array(entropy), np.array(accepted), np.array(canvas)
        rows.append(dict(step=n, givens_entropy=float((h * given).sum(1).mean()),
                         blanks_accepted=float((a & blank).sum(1).mean()),
                         wrong_accepted=float(((c != solution) & a & blank).sum(1).mean()),
                         blank_entropy=float(((h * blank).sum(1) / blank.sum(1)).mean())))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blanks", type=int, default=30)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-forward-pinned", action="store_true",
                        help="the pins in the canvas's first forward too (the rule before)")
    args = parser.parse_args()
    model, tokenizer = load(DEFAULT_MODEL)
    model = dequantize_model(model)
    cases = puzzles(args.blanks, args.n)
    print("| decoding | step | givens' entropy (sum) | blanks accepted | of them wrong | blanks' mean entropy |")
    print("|---|---|---|---|---|---|")
    for pinned in (False, True):
        for r in trace(model, tokenizer, cases, pinned, args.seed, args.first_forward_pinned):
            if r["step"] <= 4 or r["step"] % 4 == 0:
                print(f"| {'pinned' if pinned else 'free'} | {r['step']} | {r['givens_entropy']:.2f} | "
                      f"{r['blanks_accepted']:.2f} | {r['wrong_accepted']:.2f} | {r['blank_entropy']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
