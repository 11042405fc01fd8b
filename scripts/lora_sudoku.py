"""LoRA fine-tune of the Sudoku base model on 50-blank puzzles, from a fixed seed: the
model shipped in `mlx_diffusiongemma/demos/sudoku/model` is its output.

The base (`scripts/sudoku_base`, trained by train_sudoku.py on 20-54 blanks) solves about
1% of 50-blank puzzles. This script writes a data folder in mlx-lm's chat format
(generated puzzles with unique solutions, relabelled by Sudoku symmetries; most at 50
blanks, some easier ones replayed so that 30 and 40 blanks are kept; with `--pinned-rate R`
the givens are marked as `pinned_spans` and kept clean, as `pin_givens` holds them, in that
share of the examples: measured and not shipped, benchmarks/README.md), trains a LoRA
adapter with the block-diffusion objective through the package's own fine-tuning code,
fuses it into a float32 model directory (OUT/fused), and ships it: fused into the 4-bit
base and re-quantized with its bits per layer (as `mlx-diffusiongemma fuse` writes it),
copied into the package (skip with --no-ship).

Training runs on the 4-bit weights dequantized to float32: the same values (so the
adapter applies to the 4-bit base unchanged), on this CPU's fast float32 GEMM instead of
MLX's slow quantized kernels.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        OPENBLAS_NUM_THREADS=1 python scripts/lora_sudoku.py --out runs/lora_sudoku
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_sudoku as base  # noqa: E402  (augmentation helpers of the training script)

from mlx_diffusiongemma.demos.sudoku import puzzles as sudoku  # noqa: E402
from mlx_diffusiongemma.demos.sudoku.solver import DEFAULT_MODEL  # noqa: E402  (where the result ships)
from mlx_diffusiongemma.loading import load  # noqa: E402
from mlx_diffusiongemma.tuner import lora  # noqa: E402
from mlx_diffusiongemma.tuner.datasets import load_dataset  # noqa: E402
from mlx_diffusiongemma.tuner.finetune import LoRATrainingArgs, ObjectiveArgs, print_report, train_lora  # noqa: E402

SEED = 20261201
# Puzzle seeds no other script uses (training pool 1, tuning 5e6 + blanks, evaluation 7e6 + blanks).
POOL_SEED = 3_000_000
VALID_SEED = 3_500_000
BLANKS = 50


def chat_line(puzzle: np.ndarray, solution: np.ndarray, pinned: bool) -> str:
    """A chat line; with `pinned` its answer marks the givens as `pinned_spans` (what
    `pin_givens` pins: cell k is character 10 * (k // 9) + k % 9 of the formatted grid)."""
    messages = [{"role": "user", "content": sudoku.format_grid(base.to_grid(puzzle))},
                {"role": "assistant", "content": sudoku.format_grid(base.to_grid(solution))}]
    if not pinned:
        return json.dumps({"messages": messages})
    spans = [[10 * (k // 9) + k % 9, 10 * (k // 9) + k % 9 + 1] for k in map(int, np.flatnonzero(puzzle))]
    return json.dumps({"messages": messages, "pinned_spans": spans})


def write_data(out: Path, n_train: int, pool_size: int, replay: float, n_valid: int, seed: int,
               pinned: bool = False) -> Path:
    """train.jsonl: `n_train` relabelled copies of a pool of 50-blank puzzles, a `replay`
    share with cells revealed down to 30-45 blanks; valid.jsonl: other 50-blank puzzles."""
    rng = np.random.default_rng(seed)
    pool = sudoku.make_dataset(POOL_SEED, pool_size, BLANKS)
    puzzles, solutions = base.to_cells([p for p, _ in pool]), base.to_cells([s for _, s in pool])
    lines = []
    for i in rng.integers(0, len(pool), n_train):
        blanks = int(rng.integers(30, 46)) if rng.random() < replay else BLANKS
        lines.append(chat_line(*base.augment(puzzles[i], solutions[i], blanks, rng), pinned))
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    valid = sudoku.make_dataset(VALID_SEED, n_valid, BLANKS)
    (data / "valid.jsonl").write_text("\n".join(
        chat_line(*base.to_cells([p, s]), pinned) for p, s in valid) + "\n")
    return data


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/lora_sudoku"))
    p.add_argument("--iters", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--keys", nargs="+", default=None, help="LoRA keys (default: attention and dense MLP)")
    p.add_argument("--pool-size", type=int, default=2000)
    p.add_argument("--replay", type=float, default=0.25, help="share of easier (30-45 blank) examples")
    p.add_argument("--noise-exponent", type=float, default=0.5)
    p.add_argument("--self-conditioning-rate", type=float, default=0.8)
    p.add_argument("--pinned-rate", type=float, default=0.0,
                   help="share of examples trained with the givens clean (0: givens not marked, as shipped)")
    p.add_argument("--save-every", type=int, default=400)
    p.add_argument("--steps-per-eval", type=int, default=400)
    p.add_argument("--no-ship", action="store_true", help="leave the package's model as it is")
    return p.parse_args()


def main():
    args = parse_args()
    out = args.out
    tic = time.perf_counter()
    data = write_data(out, args.iters * args.batch_size, args.pool_size, args.replay, 64, SEED, args.pinned_rate > 0)
    print(f"wrote {data} in {time.perf_counter() - tic:.0f}s", flush=True)
    model, tokenizer = load(base.BASE_MODEL)
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    sets = load_dataset(data, tokenizer, ("train", "valid"))
    params = lora.lora_parameters(rank=args.rank, scale=args.scale, dropout=0.0, keys=args.keys)
    lora.detach_routers(model)
    lora.apply_lora(model, -1, params)
    trainable, total = lora.trainable_count(model)
    print(f"trainable {trainable} of {total} parameters ({100 * trainable / total:.2f}%)", flush=True)
    targs = LoRATrainingArgs(
        iters=args.iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
        steps_per_eval=args.steps_per_eval, val_batches=-1, save_every=args.save_every,
        adapter_file=str(out / "adapters" / lora.ADAPTER_FILE), seed=SEED,
        lr_schedule={"name": "cosine_decay", "arguments": [args.learning_rate, args.iters, args.learning_rate / 10],
                     "warmup": min(50, args.iters // 10)},
        objective=ObjectiveArgs(noise_exponent=args.noise_exponent,
                                self_conditioning_rate=args.self_conditioning_rate,
                                pinned_rate=args.pinned_rate),
    )
    config = lora.adapter_config(model, -1, params, dict(model=str(base.BASE_MODEL), seed=SEED, iters=args.iters,
                                                         batch_size=args.batch_size, learning_rate=args.learning_rate,
                                                         pinned_rate=args.pinned_rate))
    start = time.perf_counter()
    train_lora(model, sets["train"], sets["valid"], targs,
               save=lambda path: lora.save_adapters(model, Path(path).parent, config, Path(path).name),
               report=print_report)
    seconds = time.perf_counter() - start
    size = (out / "adapters" / lora.ADAPTER_FILE).stat().st_size
    print(f"trained {args.iters} iterations in {seconds:.0f}s ({args.iters / seconds:.3f} it/s); "
          f"adapter {size / 1e6:.2f} MB", flush=True)
    lora.fuse(model, dequantize=True)
    fused = lora.save_model(model, base.BASE_MODEL, out / "fused", overwrite=True)
    print(f"fused float32 model in {fused}", flush=True)
    if not args.no_ship:
        ship(out / "adapters")


def ship(adapters: Path) -> None:
    """The adapter fused into the 4-bit base, re-quantized, as the package's model."""
    model, _ = load(base.BASE_MODEL, adapter_path=adapters)
    lora.fuse(model, dequantize=False)
    shipped = lora.save_model(model, base.BASE_MODEL, DEFAULT_MODEL, overwrite=True)
    print(f"shipped {sum(f.stat().st_size for f in shipped.iterdir()) / 1e6:.1f} MB to {shipped}", flush=True)


if __name__ == "__main__":
    main()
