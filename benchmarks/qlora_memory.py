"""Peak memory of one QLoRA step on the full-size 4-bit model, measured at full width.

Builds the released architecture quantized as a converted checkpoint is loaded (random
packed weights, no bf16 copy ever made: `full_size_memory.build`), cut to a few layers,
adds LoRA adapters the way `mlx-diffusiongemma lora` does (`tuner.lora`: attention and the
dense MLP, experts and router frozen), and runs one optimizer step of the block-diffusion
objective (`tuner.finetune.lora_loss`: a `--prompt`-token prompt in the encoder, one
256-token canvas, the detached self-conditioning pass, Adam) on one example. Prints one
JSON line: the MLX peak, the weights, the adapter and optimizer bytes.

    python benchmarks/qlora_memory.py --dtype float32                       # 1 sliding + 1 full layer
    python benchmarks/qlora_memory.py --dtype float32 --grad-checkpoint
    python benchmarks/qlora_memory.py --dtype float32 --layer-types full --vocab-size 8192

Per-layer costs do not depend on the vocabulary, so the runs that difference layer counts
(`--layer-types`) may shrink it (`--vocab-size`) to skip most of the tied head's cost on a
slow CPU; benchmarks/README.md extrapolates to the 30 layers from those differences.
"""

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from full_size_memory import build
from mlx.utils import tree_flatten

from mlx_diffusiongemma.tuner import lora
from mlx_diffusiongemma.tuner.datasets import Example
from mlx_diffusiongemma.tuner.finetune import ObjectiveArgs, lora_loss, make_batch

TYPES = {"sliding": "sliding_attention", "full": "full_attention"}


def nbytes(tree) -> int:
    return sum(a.nbytes for _, a in tree_flatten(tree))


def adapted(args) -> nn.Module:
    """The cut model with LoRA of `args.rank` on every layer, routers detached."""
    model = build(None, getattr(mx, args.dtype), layer_types=[TYPES[t] for t in args.layer_types],
                  vocab_size=args.vocab_size)
    lora.detach_routers(model)
    lora.apply_lora(model, -1, lora.lora_parameters(rank=args.rank, scale=args.scale, dropout=0.0))
    # The experts through one gather_qmm, as on a Mac's GPU: the CPU backend's per-expert
    # GEMMs hold ~0.4 GB more per full-width layer until the backward pass (measured).
    model.moe_grouped = False
    mx.eval(model.parameters())
    return model


def one_step(model, args) -> tuple[float, int]:
    """One Adam step on a random example: (loss, optimizer state bytes)."""
    V, L = model.args.vocab_size, model.args.canvas_length
    rng = mx.random.key(0)
    ids = mx.random.randint(2, V, (args.prompt + L,), key=rng).tolist()
    example = Example(prompt=ids[: args.prompt], answer=ids[args.prompt :])
    batch = make_batch([example], [0], L, model.args.pad_token_id)
    objective = ObjectiveArgs(grad_checkpoint=args.grad_checkpoint)
    loss_and_grad = nn.value_and_grad(model, lora_loss)
    optimizer = optim.Adam(learning_rate=1e-5)
    (loss, _), grads = loss_and_grad(model, batch, mx.random.key(1), args.self_condition, objective)
    optimizer.update(model, grads)
    mx.eval(loss, model.parameters(), optimizer.state)
    return loss.item(), nbytes(optimizer.state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-types", nargs="+", choices=sorted(TYPES), default=["sliding", "full"])
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the released 262,144")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens in the encoder")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--no-self-condition", dest="self_condition", action="store_false")
    args = parser.parse_args()
    start = time.perf_counter()
    model = adapted(args)
    weights, trainable = nbytes(model.parameters()), nbytes(model.trainable_parameters())
    built = time.perf_counter() - start
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    loss, optimizer_bytes = one_step(model, args)
    record = dict(vars(args), vocab=model.args.vocab_size, weights_gb=weights / 1e9, adapter_gb=trainable / 1e9,
                  optimizer_gb=optimizer_bytes / 1e9, peak_gb=mx.get_peak_memory() / 1e9,
                  activations_gb=(mx.get_peak_memory() - weights - optimizer_bytes) / 1e9,
                  loss=loss, build_s=round(built), step_s=round(time.perf_counter() - start))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
