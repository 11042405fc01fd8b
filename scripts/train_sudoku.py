"""Train the base of the small Sudoku DiffusionGemma: `scripts/sudoku_base/`, which
`lora_sudoku.py` fine-tunes into the model shipped in `mlx_diffusiongemma/demos/sudoku/model/`.

From a fixed seed: build the tokenizer, the config and a pool of generated puzzles;
train with the block-diffusion objective on augmented puzzles (digit relabelling, band,
stack, row and column shuffles, transposition, revealing cells for easier puzzles);
save the model in the released Hugging Face layout; convert it with the project's
converter (default 4-bit recipe) and copy the converted model to `scripts/sudoku_base/`.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        OPENBLAS_NUM_THREADS=1 python scripts/train_sudoku.py --out runs/sudoku

(the base weights came from this command: 55 min on the 2-core machine while a second
training run shared it.)
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlx_diffusiongemma.demos.sudoku import puzzles as sudoku
from mlx_diffusiongemma.models import Model, ModelArgs
from mlx_diffusiongemma.demos.sudoku.tokenizer import PAD_ID, TURN_END_ID, build_tokenizer, render_prompt
from mlx_diffusiongemma.tuner.trainer import TrainingArgs, count_parameters, save_checkpoint, train

SEED = 20260501
POOL_SEED = 1
POOL_BLANKS = (44, 54)
# Easier puzzles add little: a partly clean canvas already shows the model nearly solved grids.
MIN_BLANKS = 20
# The 89-token grid (nine rows of nine digits) plus the end-of-turn token.
CANVAS = 90
VOCAB = 512
EXTRA_TOKENS = ["user", "model", "thought"]
BASE_MODEL = Path(__file__).resolve().parent / "sudoku_base"

SLIDING_THETA = (10 / (2 * math.pi)) ** 16  # about 1694.8; frequency k is theta ** (-k / 32)
# Full layers rotate 16 of 64 frequency pairs, theta ** (-k / 64): frequency 2 is 2*pi/10 too.
FULL_THETA = (10 / (2 * math.pi)) ** 32
LAYER_TYPES = ["sliding_attention", "full_attention"] * 2
TEXT_CONFIG = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "dtype": "float32",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "global_head_dim": 128,
    "head_dim": 64,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "layer_types": LAYER_TYPES,
    "max_position_embeddings": 4096,
    "model_type": "diffusion_gemma_text",
    "moe_intermediate_size": 128,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_global_key_value_heads": 1,
    "num_hidden_layers": len(LAYER_TYPES),
    "num_key_value_heads": 2,
    "pad_token_id": PAD_ID,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": FULL_THETA, "rope_type": "proportional"},
        # Rows are 10 tokens apart (nine cells and a newline): this theta makes one of the
        # 32 rotary frequencies exactly 2*pi/10, so "same column" is one frequency.
        "sliding_attention": {"rope_theta": SLIDING_THETA, "rope_type": "default"},
    },
    # Smaller than the ~100-token prompt, so sliding layers see only part of the puzzle.
    "sliding_window": 64,
    "tie_word_embeddings": True,
    "top_k_experts": 2,
    "use_bidirectional_attention": "vision",
    "vocab_size": VOCAB,
}
CONFIG = {
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "canvas_length": CANVAS,
    "dtype": "float32",
    "eos_token_id": [1, TURN_END_ID],
    "model_type": "diffusion_gemma",
    "text_config": TEXT_CONFIG,
    "tie_word_embeddings": True,
    "transformers_version": "5.23.0",
    "vision_config": None,
}
# Sampler defaults for this task (the reference's are for open-ended chat), chosen on an
# earlier model of this script (uniform noise level, half the steps self-conditioned). Sampling
# hot, from temperature 2.0 down to 1.0, keeps the canvas exploring instead of settling on an
# early wrong digit: on 100 tuning puzzles (not the evaluation's) 49% solved at 40 blanks against
# 33% at 0.8 -> 0.4, and 92% against 88% at 30; colder (0.3 -> 0.1) halves the 40-blank rate and
# 3.0 -> 1.0 is too hot (26%). The looser stop (mean entropy 0.05) saves a quarter of the steps
# at 30 blanks with the same solves.
GENERATION_CONFIG = {
    "confidence_threshold": 0.05,
    "eos_token_id": [1, TURN_END_ID, 50],
    "max_denoising_steps": 32,
    "max_new_tokens": CANVAS,
    "pad_token_id": PAD_ID,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "stability_threshold": 1,
    "t_max": 2.0,
    "t_min": 1.0,
    "transformers_version": "5.23.0",
}


def prompt_text(puzzle: str) -> str:
    """The chat-templated user turn holding the puzzle, ready for the model's answer."""
    return render_prompt([{"role": "user", "content": sudoku.format_grid(puzzle)}])


def prompt_template() -> tuple[str, str]:
    """The text around the grid in `prompt_text` (rendering the template per puzzle is slow)."""
    marker = "\n".join(["@" * 9] * 9)
    before, after = render_prompt([{"role": "user", "content": marker}]).split(marker)
    return before, after


def to_cells(grids: list[str]) -> np.ndarray:
    """(N, 81) digits, 0 for blanks."""
    return np.array([[0 if ch == sudoku.BLANK else int(ch) for ch in g] for g in grids], dtype=np.int64)


def to_grid(cells: np.ndarray) -> str:
    return "".join(sudoku.BLANK if v == 0 else str(v) for v in cells)


def symmetry(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random validity-preserving relabelling: a cell permutation and a digit permutation."""
    rows = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    cols = np.concatenate([3 * s + rng.permutation(3) for s in rng.permutation(3)])
    cells = (rows[:, None] * 9 + cols[None, :])
    if rng.random() < 0.5:
        cells = cells.T
    digits = np.concatenate([[0], 1 + rng.permutation(9)])
    return cells.reshape(-1), digits


def augment(puzzle: np.ndarray, solution: np.ndarray, blanks: int, rng: np.random.Generator):
    """A relabelled copy of a puzzle with cells revealed until `blanks` remain.

    Revealing solution cells keeps the solution unique.
    """
    cells, digits = symmetry(rng)
    puzzle, solution = digits[puzzle[cells]], digits[solution[cells]]
    hidden = np.flatnonzero(puzzle == 0)
    reveal = rng.choice(hidden, size=max(len(hidden) - blanks, 0), replace=False)
    puzzle = puzzle.copy()
    puzzle[reveal] = solution[reveal]
    return puzzle, solution


class SudokuBatches:
    """Endless batches of (prompt ids, target canvas) with a blank-count curriculum."""

    def __init__(self, tokenizer: Tokenizer, pool: list[tuple[str, str]], batch_size: int,
                 ramp_steps: int, seed: int):
        self.tokenizer = tokenizer
        self.puzzles = to_cells([p for p, _ in pool])
        self.solutions = to_cells([s for _, s in pool])
        self.batch_size, self.ramp_steps = batch_size, ramp_steps
        self.rng = np.random.default_rng(seed)
        self.around = prompt_template()
        self.step = 0

    def max_blanks(self) -> int:
        # Easy puzzles first, then up to the pool's hardest.
        frac = min(1.0, self.step / max(self.ramp_steps, 1))
        return round(30 + frac * (POOL_BLANKS[1] - 30))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[mx.array, mx.array]:
        self.step += 1
        prompts, targets = [], []
        for i in self.rng.integers(0, len(self.puzzles), self.batch_size):
            blanks = int(self.rng.integers(MIN_BLANKS, self.max_blanks() + 1))
            puzzle, solution = augment(self.puzzles[i], self.solutions[i], blanks, self.rng)
            prompts.append(sudoku.format_grid(to_grid(puzzle)).join(self.around))
            targets.append(target_ids(self.tokenizer, to_grid(solution)))
        ids = [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]
        return mx.array(ids, dtype=mx.int32), mx.array(targets, dtype=mx.int32)


def target_ids(tokenizer: Tokenizer, solution: str) -> list[int]:
    """The answer canvas: the solution grid, end of turn, then padding."""
    ids = tokenizer.encode(sudoku.format_grid(solution), add_special_tokens=False).ids + [TURN_END_ID]
    return ids + [PAD_ID] * (CANVAS - len(ids))


def init_model(seed: int) -> Model:
    """A freshly initialized model; q/k norms start at D**-0.25 so that attention (scale
    1.0) starts with the usual 1/sqrt(D) temperature instead of saturating."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_config(CONFIG, GENERATION_CONFIG))
    for layer in model.layers:
        attn = layer.self_attn
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight = mx.full(norm.weight.shape, attn.head_dim ** -0.25)
    mx.eval(model.parameters())
    return model


def save_hf(model: Model, out: Path, tokenizer_dir: Path) -> Path:
    """Checkpoint plus tokenizer files, in the released layout."""
    save_checkpoint(model, out, CONFIG, GENERATION_CONFIG)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def ship(hf_dir: Path, out: Path) -> None:
    """Convert with the project's converter (default recipe) and copy to BASE_MODEL."""
    from mlx_diffusiongemma.convert import convert

    converted = out / "mlx-4bit"
    if converted.exists():
        shutil.rmtree(converted)
    convert(str(hf_dir), str(converted), quantize=True)
    if BASE_MODEL.exists():
        shutil.rmtree(BASE_MODEL)
    shutil.copytree(converted, BASE_MODEL)
    print(f"wrote {sum(f.stat().st_size for f in BASE_MODEL.iterdir()) / 1e6:.1f} MB to {BASE_MODEL}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/sudoku"))
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    # Both lean the objective toward what the sampler does: start from pure noise and refine
    # its own previous logits. On 100 tuning puzzles at 40 blanks: 49% solved with exponent 1.0
    # and rate 0.5 (uniform noise level, the earlier recipe), 62% with exponent 0.5, 77% with
    # exponent 0.5 and rate 0.8 (benchmarks/README.md).
    parser.add_argument("--noise-exponent", type=float, default=0.5,
                        help="corrupted fraction t = u ** EXPONENT; below 1 leans toward heavy noise")
    parser.add_argument("--self-conditioning-rate", type=float, default=0.8,
                        help="share of steps that train the self-conditioned second pass")
    parser.add_argument("--pool-size", type=int, default=2000, help="generated puzzles to augment from")
    parser.add_argument("--save-every", type=int, default=250)
    # On CPU, uncompiled training with per-expert GEMMs is ~10% faster than compiled gather_mm.
    parser.add_argument("--compile", action="store_true", help="compile the training step (faster on GPU)")
    parser.add_argument("--no-ship", action="store_true", help="skip conversion and copying to scripts/sudoku_base")
    parser.add_argument("--ship-only", action="store_true",
                        help="skip training: refresh OUT/hf/generation_config.json, convert and ship OUT/hf")
    return parser.parse_args()


def main():
    args = parse_args()
    out = args.out
    if args.ship_only:
        (out / "hf" / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        ship(out / "hf", out)
        return
    tok_dir = build_tokenizer(out / "tokenizer", EXTRA_TOKENS, VOCAB)
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tic = time.perf_counter()
    pool = sudoku.make_dataset(POOL_SEED, args.pool_size, POOL_BLANKS)
    print(f"generated {len(pool)} puzzles in {time.perf_counter() - tic:.0f}s", flush=True)
    model = init_model(SEED)
    print(f"{count_parameters(model) / 1e6:.2f}M parameters", flush=True)
    targs = TrainingArgs(
        steps=args.steps, learning_rate=args.learning_rate, warmup_steps=min(200, args.steps // 10),
        seed=SEED, compile=args.compile, noise_exponent=args.noise_exponent,
        self_conditioning_rate=args.self_conditioning_rate,
    )
    batches = SudokuBatches(tokenizer, pool, args.batch_size, ramp_steps=int(0.4 * args.steps), seed=SEED)
    log = (out / "train_log.jsonl").open("a")
    start = time.perf_counter()

    def on_step(r):
        elapsed = time.perf_counter() - start
        record = dict(step=r.step, loss=round(r.loss, 5), lr=r.learning_rate, sc=r.self_condition,
                      max_blanks=batches.max_blanks(), seconds=round(elapsed, 1))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if r.step % 10 == 0:
            print(f"step {r.step} loss {r.loss:.4f} lr {r.learning_rate:.2e} {elapsed:.0f}s", flush=True)
        if r.step % args.save_every == 0 or r.step == args.steps:
            save_hf(model, out / "hf", tok_dir)

    train(model, batches, targs, on_step)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f}s", flush=True)
    hf_dir = save_hf(model, out / "hf", tok_dir)
    if not args.no_ship:
        ship(hf_dir, out)


if __name__ == "__main__":
    main()
