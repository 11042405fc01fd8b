"""Block-diffusion training: the objective the sampler assumes, and a small training loop.

The prompt runs through the causal encoder into fresh per-layer caches; a random fraction
of the target canvas (drawn per example) is replaced by uniform random tokens; the
bidirectional decoder reads the caches and is trained to predict the clean token at every
canvas position. In a share of the steps a first decoder pass without self-conditioning
gives detached logits that condition the second pass, as the sampler feeds its previous
step's logits. Everything is built from the model's layer pieces, so it works on any
(unquantized) `Model`, including one loaded from a released or converted checkpoint.
"""

import json
import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..models.diffusion_gemma import Router

# Checkpoint names of the fused expert tensors carry no `.weight` suffix.
EXPERT_SUFFIXES = (".experts.gate_up_proj.weight", ".experts.down_proj.weight")


class DetachedRouter(Router):
    """`Router` whose expert choice is a constant for differentiation.

    MLX cannot differentiate a gather through its indices, and the chosen experts index
    several gathers; gradients still reach the router through the chosen experts' weights.
    """

    def top_k(self, probs: mx.array) -> mx.array:
        return mx.stop_gradient(super().top_k(probs))


def make_trainable(model) -> None:
    """Swap each layer's router for a `DetachedRouter` holding the same parameters."""
    for layer in model.layers:
        if type(layer.router) is Router:
            router = DetachedRouter(model.args)
            router.update(layer.router.parameters())
            layer.router = router


def encoded_cache(model, prompt_ids: mx.array) -> list:
    """Fresh caches holding a differentiable causal encoder pass over `prompt_ids` (B, L):
    `Model.encode` in one unevaluated chunk, so the decoder's loss reaches the encoder."""
    cache = model.make_cache()
    model.encode_chunk(prompt_ids, cache)
    return cache


def corrupt(
    targets: mx.array, vocab_size: int, key: mx.array, noise_exponent: float = 1.0,
) -> tuple[mx.array, mx.array]:
    """Replace a fraction t = u ** noise_exponent, u ~ U(0, 1), of each row's tokens (t drawn
    per row) by uniform random tokens over the whole vocabulary, like the sampler's noise.
    An exponent below 1 leans toward heavily corrupted canvases, where the sampler starts.

    Returns the noisy canvas and the boolean mask of replaced positions.
    """
    B, L = targets.shape
    t_key, pos_key, noise_key = mx.random.split(key, 3)
    t = mx.random.uniform(shape=(B, 1), key=t_key) ** noise_exponent
    replaced = mx.random.uniform(shape=(B, L), key=pos_key) < t
    noise = mx.random.randint(0, vocab_size, (B, L), dtype=targets.dtype, key=noise_key)
    return mx.where(replaced, noise, targets), replaced


def diffusion_loss(
    model, prompt_ids: mx.array, targets: mx.array, key: mx.array,
    self_condition: bool = False, clean_weight: float = 1.0, noise_exponent: float = 1.0,
) -> mx.array:
    """Weighted mean cross-entropy of the clean canvas `targets` (B, canvas) given the
    prompt and a corrupted canvas (see `corrupt`); positions left clean weigh `clean_weight`."""
    cache = encoded_cache(model, prompt_ids)
    noisy, replaced = corrupt(targets, model.args.vocab_size, key, noise_exponent)
    signal = None
    if self_condition:
        # Temperature-free, like the logits the sampler would pass at temperature 1.
        signal = mx.stop_gradient(model.denoise(noisy, cache))
    logits = model.denoise(noisy, cache, signal)
    weights = mx.where(replaced, 1.0, clean_weight)
    ce = nn.losses.cross_entropy(logits, targets)
    return (ce * weights).sum() / weights.sum()


@dataclass
class TrainingArgs:
    """Optimizer, schedule and objective settings for `train`."""

    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    self_conditioning_rate: float = 0.5
    clean_weight: float = 1.0
    noise_exponent: float = 1.0
    seed: int = 0
    compile: bool = True


def make_optimizer(args: TrainingArgs) -> optim.Optimizer:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * learning_rate`."""
    warmup = optim.linear_schedule(args.learning_rate / 100, args.learning_rate, max(args.warmup_steps, 1))
    decay_steps = max(args.steps - args.warmup_steps, 1)
    cosine = optim.cosine_decay(args.learning_rate, decay_steps, args.learning_rate * args.min_lr_ratio)
    schedule = optim.join_schedules([warmup, cosine], [max(args.warmup_steps, 1)])
    return optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)


def make_step(model, optimizer: optim.Optimizer, args: TrainingArgs) -> Callable:
    """A training step `step(prompt_ids, targets, key, self_condition) -> loss`.

    With `args.compile`, each value of `self_condition` gets its own compiled graph.
    """
    loss_and_grad = nn.value_and_grad(model, diffusion_loss)

    def step(prompt_ids, targets, key, self_condition):
        loss, grads = loss_and_grad(
            model, prompt_ids, targets, key, self_condition, args.clean_weight, args.noise_exponent
        )
        if args.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(model, grads)
        return loss

    if not args.compile:
        return step
    state = [model.state, optimizer.state]
    compiled = {
        flag: mx.compile(partial(step, self_condition=flag), inputs=state, outputs=state)
        for flag in (False, True)
    }
    return lambda prompt_ids, targets, key, self_condition: compiled[self_condition](prompt_ids, targets, key)


@dataclass
class StepReport:
    """What `train` reports after each step."""

    step: int
    loss: float
    learning_rate: float
    self_condition: bool


def train(
    model, batches: Iterator[tuple[mx.array, mx.array]], args: TrainingArgs,
    on_step: Callable[[StepReport], None] | None = None,
) -> list[float]:
    """Train `model` in place for `args.steps` batches of `(prompt_ids, targets)`.

    Returns the loss of every step; `on_step` sees each step's report (for logging and
    checkpointing). The random choices (noise, self-conditioning steps) follow `args.seed`.
    """
    make_trainable(model)
    model.train()
    # Host-side expert grouping (per-expert GEMMs, faster on CPU) cannot run inside
    # mx.compile; uncompiled training keeps it.
    grouped = getattr(model, "moe_grouped", False)
    model.moe_grouped = grouped and not args.compile
    optimizer = make_optimizer(args)
    step = make_step(model, optimizer, args)
    rng = random.Random(args.seed)
    key = mx.random.key(args.seed)
    losses = []
    for n in range(1, args.steps + 1):
        prompt_ids, targets = next(batches)
        key, step_key = mx.random.split(key)
        self_condition = rng.random() < args.self_conditioning_rate
        loss = step(prompt_ids, targets, step_key, self_condition)
        mx.eval(loss, model.state, optimizer.state)
        losses.append(loss.item())
        if on_step is not None:
            on_step(StepReport(n, losses[-1], optimizer.learning_rate.item(), self_condition))
    model.moe_grouped = grouped
    model.eval()
    return losses


def checkpoint_weights(model) -> dict[str, mx.array]:
    """The model's parameters under the released checkpoint's tensor names."""
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith(EXPERT_SUFFIXES):
            name = name[: -len(".weight")]
        weights[name] = value
    return weights


def save_checkpoint(model, out_dir, config: dict, generation_config: dict, dtype=None) -> Path:
    """Write `model.safetensors`, `config.json` and `generation_config.json` in the released
    Hugging Face layout (load it back with `loading.load_model`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = checkpoint_weights(model)
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    for name, content in (("config.json", config), ("generation_config.json", generation_config)):
        (out / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return out


def count_parameters(model) -> int:
    """Number of scalars in the model's parameters."""
    return sum(math.prod(v.shape) for _, v in tree_flatten(model.parameters()))
