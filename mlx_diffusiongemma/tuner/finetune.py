"""Fine-tuning with the block-diffusion objective, the way the sampler generates.

An answer is split into canvases (`canvas_length` tokens, padding after the EOS). Each
example trains one of its canvases, drawn at random: the prompt and the answer's earlier
canvases (clean, as committed) run through the causal encoder; the canvas is corrupted
with uniform random tokens at a level t drawn per example; the bidirectional decoder reads
the encoder's keys and values and is trained to predict the clean canvas. Only answer
positions up to and including the EOS are supervised: never the prompt, never the padding
after the EOS. An example's pinned positions (given at generation time, see `datasets`)
are kept clean in a share of the examples, as the sampler holds them, so the model learns
to fill the rest around them. In a share of the steps a detached first decoder pass gives
the logits that self-condition the second, as the sampler feeds back its previous step.
An optional encoder co-loss trains the causal pass on next-token prediction over the answer.

A batch left-pads the encoder inputs to one length and masks the padding out of every
attention: the model's RoPE is relative, so each row computes what it would alone.
"""

import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..models.diffusion_gemma import causal_mask, softcap
from .args import LoRATrainingArgs, ObjectiveArgs
from .datasets import Example
from .lora import detach_routers


@dataclass
class Batch:
    """One training batch.

    `prefix` (B, T) left-padded encoder input (prompt + earlier canvases, plus the clean
    canvas itself when the encoder co-loss needs it), `valid` (B, T) its real positions,
    `decoded` the number of prefix columns the decoder reads (T without the co-loss),
    `canvas` (B, L) the clean target canvas, `supervised` (B, L) its answer positions,
    `next_token` (B, T) float weights of the encoder co-loss at each position, `pinned`
    (B, L) the canvas's pinned positions (None when no example has any).
    """

    prefix: mx.array
    valid: mx.array
    decoded: int
    canvas: mx.array
    supervised: mx.array
    next_token: mx.array | None = None
    pinned: mx.array | None = None


def canvas_count(example: Example, L: int) -> int:
    return max(1, math.ceil(len(example.answer) / L))


def make_batch(examples: list[Example], choices: list[int], L: int, pad_id: int,
               encoder_loss: bool = False, mask_prompt: bool = False, max_prefix: int | None = None) -> Batch:
    """The batch training canvas `choices[i]` of each example (see `Batch`).

    The prefix keeps at most its last `max_prefix` tokens. With `encoder_loss` the clean
    canvas follows the prefix in the encoder input and `next_token` weighs the positions
    whose next token is an answer token (and, unless `mask_prompt`, a prompt token).
    """
    rows, canvases, supervised, prompt_lens = [], [], [], []
    pinned = np.zeros((len(examples), L), dtype=bool)
    for i, (ex, c) in enumerate(zip(examples, choices)):
        pinned[i, [p - c * L for p in ex.pinned if c * L <= p < (c + 1) * L]] = True
        segment = ex.answer[c * L : (c + 1) * L]
        prefix = ex.prompt + ex.answer[: c * L]
        cut = max(0, len(prefix) - max_prefix) if max_prefix else 0
        rows.append(prefix[cut:])
        prompt_lens.append(max(len(ex.prompt) - cut, 0))
        canvases.append(segment + [pad_id] * (L - len(segment)))
        supervised.append([True] * len(segment) + [False] * (L - len(segment)))
    T = max(len(r) for r in rows)
    tail = [canvases[i][: sum(supervised[i])] if encoder_loss else [] for i in range(len(rows))]
    width = T + (L if encoder_loss else 0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    valid = np.zeros((len(rows), width), dtype=bool)
    weights = np.zeros((len(rows), width), dtype=np.float32)
    for i, (row, extra) in enumerate(zip(rows, tail)):
        start = T - len(row)
        seq = row + extra
        ids[i, start : start + len(seq)] = seq
        valid[i, start : start + len(seq)] = True
        # Position p predicts token p + 1: answer tokens, prompt tokens unless masked.
        first = start + (prompt_lens[i] if mask_prompt else 1) - 1
        weights[i, max(first, start) : start + len(seq) - 1] = 1.0
    return Batch(
        mx.array(ids), mx.array(valid), T, mx.array(np.array(canvases, dtype=np.int32)), mx.array(np.array(supervised)),
        mx.array(weights) if encoder_loss else None, mx.array(pinned) if pinned.any() else None,
    )


def _checkpointed(layer, fn, enabled: bool):
    """`fn` recomputed in the backward pass instead of storing its activations."""
    if not enabled:
        return fn

    def inner(params, *args):
        layer.update(params)
        return fn(*args)

    return lambda *args: mx.checkpoint(inner)(layer.trainable_parameters(), *args)


def encoder_pass(model, batch: Batch, full: bool, grad_checkpoint: bool = False):
    """Per-layer keys and values (B, heads, T, D) of the masked causal encoder, and the
    final hidden states when `full` (the last layer's feed-forward runs only then)."""
    decoder = model.model.decoder
    scalars = model.model.encoder.language_model.layers
    T = batch.prefix.shape[1]
    x = decoder.embed(batch.prefix)
    kv, last = [], len(model.layers) - 1
    # Padding queries see themselves, so no softmax row is empty (NaNs would leak into grads).
    eye = mx.eye(T, dtype=mx.bool_)
    for i, layer in enumerate(model.layers):
        mask = (causal_mask(0, T, 0, T, layer.self_attn.window) & batch.valid[:, None, None, :]) | eye

        def block(x, mask, layer=layer, i=i):
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.project(h, 0)
            x = x + layer.post_attention_layernorm(layer.self_attn(h, k, v, q, mask))
            if i < last or full:
                x = layer.feed_forward(x, scalars[i].layer_scalar, model.moe_grouped)
            return x, k, v

        x, k, v = _checkpointed(layer, block, grad_checkpoint)(x, mask)
        kv.append((k, v))
    return kv, x


def decoder_pass(model, canvas: mx.array, kv: list, batch: Batch, signal_logits: mx.array | None = None,
                 grad_checkpoint: bool = False) -> mx.array:
    """`Model.denoise` over the masked prefix: float32 logits (B, L, vocab)."""
    decoder = model.model.decoder
    P, L = batch.decoded, canvas.shape[1]
    x = decoder.embed(canvas)
    signal = None if signal_logits is None else decoder.soft_embed(signal_logits, x.dtype, None)
    x = decoder.self_conditioning(x, signal)
    prefix_valid = batch.valid[:, :P]
    for layer, (pk, pv) in zip(model.layers, kv):
        pk, pv, seen = pk[:, :, :P], pv[:, :, :P], prefix_valid
        window = layer.self_attn.window
        if window is not None and P > window - 1:
            # The sliding cache hands the canvas only the last window - 1 positions.
            pk, pv, seen = pk[:, :, P - window + 1 :], pv[:, :, P - window + 1 :], seen[:, P - window + 1 :]
        mask = mx.concatenate([seen, mx.ones((seen.shape[0], L), dtype=mx.bool_)], axis=1)[:, None, None, :]

        def block(x, pk, pv, mask, layer=layer):
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.project(h, P)
            k, v = mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2)
            x = x + layer.post_attention_layernorm(layer.self_attn(h, k, v, q, mask))
            return layer.feed_forward(x, layer.layer_scalar, model.moe_grouped)

        x = _checkpointed(layer, block, grad_checkpoint)(x, pk, pv, mask)
    return lm_logits(model, x)


def lm_logits(model, x: mx.array) -> mx.array:
    decoder = model.model.decoder
    x = decoder.norm(x)
    return softcap(decoder.embed_tokens.as_linear(x), mx.array(model.args.final_logit_softcapping))


def corrupt_canvas(canvas: mx.array, vocab_size: int, key: mx.array, noise_min: float, noise_exponent: float,
                   keep: mx.array | None = None):
    """Noisy canvas and replaced-position mask (uniform random tokens, level per row);
    the positions of `keep` (B, L) stay clean."""
    B, L = canvas.shape
    t_key, pos_key, noise_key = mx.random.split(key, 3)
    t = noise_min + (1 - noise_min) * mx.random.uniform(shape=(B, 1), key=t_key) ** noise_exponent
    replaced = mx.random.uniform(shape=(B, L), key=pos_key) < t
    if keep is not None:
        replaced = replaced & ~keep
    noise = mx.random.randint(0, vocab_size, (B, L), dtype=canvas.dtype, key=noise_key)
    return mx.where(replaced, noise, canvas), replaced


def noisy_canvas(batch: Batch, vocab_size: int, key: mx.array, args: ObjectiveArgs):
    """The batch's corrupted canvas and replaced mask: each row with pinned positions keeps
    them clean with probability `args.pinned_rate`."""
    keep = None
    if batch.pinned is not None:
        # Split only here, so batches without pinned positions keep their key chain.
        key, pin_key = mx.random.split(key)
        keep = batch.pinned & (mx.random.uniform(shape=(batch.pinned.shape[0], 1), key=pin_key) < args.pinned_rate)
    return corrupt_canvas(batch.canvas, vocab_size, key, args.noise_min, args.noise_exponent, keep)


def lora_loss(model, batch: Batch, key: mx.array, self_condition: bool, args: ObjectiveArgs):
    """(loss, supervised tokens): mean cross-entropy over the canvas's answer positions,
    plus `encoder_loss_weight` times the encoder's next-token loss."""
    full = args.encoder_loss_weight > 0 and batch.next_token is not None
    kv, hidden = encoder_pass(model, batch, full, args.grad_checkpoint)
    noisy, replaced = noisy_canvas(batch, model.args.vocab_size, key, args)
    signal = None
    if self_condition:
        # Temperature-free logits of a first pass, as the sampler's previous step; no gradient.
        signal = mx.stop_gradient(decoder_pass(model, noisy, kv, batch))
    logits = decoder_pass(model, noisy, kv, batch, signal, args.grad_checkpoint)
    weights = mx.where(replaced, 1.0, args.clean_weight) * batch.supervised
    ce = nn.losses.cross_entropy(logits, batch.canvas)
    ntoks = batch.supervised.sum()
    loss = (ce * weights).sum() / mx.maximum(weights.sum(), 1e-9)
    if full:
        enc_logits = lm_logits(model, hidden[:, :-1])
        w = batch.next_token[:, :-1]
        enc_ce = nn.losses.cross_entropy(enc_logits, batch.prefix[:, 1:])
        loss = loss + args.encoder_loss_weight * (enc_ce * w).sum() / mx.maximum(w.sum(), 1.0)
    return loss, ntoks


def iterate_batches(examples: list[Example], batch_size: int, L: int, pad_id: int, seed: int,
                    loop: bool = True, **batch_kw) -> Iterator[Batch]:
    """Batches of examples of similar prefix length (like mlx-lm, sorted then shuffled by
    batch), each example with a canvas drawn from `seed`'s generator; endless with `loop`."""
    if not examples:
        raise ValueError("no examples to batch")
    rng = random.Random(seed)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].answer))
    size = min(batch_size, len(examples))
    starts = list(range(0, len(order) - size + 1, size)) if loop else list(range(0, len(order), size))
    while True:
        for s in rng.sample(starts, len(starts)) if loop else starts:
            chunk = [examples[i] for i in order[s : s + size]]
            choices = [rng.randrange(canvas_count(ex, L)) for ex in chunk]
            yield make_batch(chunk, choices, L, pad_id, **batch_kw)
        if not loop:
            return


@dataclass
class Report:
    """A progress report: `kind` is "train" (every `steps_per_report`), "step" (every
    iteration, for a live line), "val" or "save"."""

    kind: str
    iteration: int
    loss: float | None = None
    learning_rate: float | None = None
    its_per_sec: float | None = None
    tokens_per_sec: float | None = None
    trained_tokens: int = 0
    peak_memory_gb: float = 0.0
    seconds: float | None = None
    path: str | None = None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the adapter was saved to `path` at `iteration`."""

    def __init__(self, iteration: int, path: str):
        super().__init__(f"interrupted at iteration {iteration}")
        self.iteration, self.path = iteration, path


def _batch_kw(model, args: LoRATrainingArgs) -> dict:
    obj = args.objective
    return dict(encoder_loss=obj.encoder_loss_weight > 0, mask_prompt=obj.mask_prompt,
                max_prefix=args.max_seq_length)


def evaluate(model, examples: list[Example], args: LoRATrainingArgs, num_batches: int = -1, seed: int = 1) -> float:
    """Token-weighted mean loss over `num_batches` batches (-1: all), from fixed draws of
    canvas, noise level and self-conditioning so evaluations compare."""
    model.eval()
    L, pad = model.args.canvas_length, model.args.pad_token_id
    batches = iterate_batches(examples, args.batch_size, L, pad, seed, loop=False, **_batch_kw(model, args))
    rng, key = random.Random(seed), mx.random.key(seed)
    total, ntoks = 0.0, 0
    for n, batch in enumerate(batches):
        if num_batches != -1 and n >= num_batches:
            break
        key, sub = mx.random.split(key)
        sc = rng.random() < args.objective.self_conditioning_rate
        loss, toks = lora_loss(model, batch, sub, sc, args.objective)
        mx.eval(loss, toks)
        total += loss.item() * toks.item()
        ntoks += toks.item()
    return total / max(ntoks, 1)


def make_optimizer(args: LoRATrainingArgs) -> optim.Optimizer:
    """Adam at `learning_rate`, or mlx-lm's `lr_schedule` block (name, arguments, warmup)."""
    lr = args.learning_rate
    if args.lr_schedule:
        from mlx_lm.tuner.utils import build_schedule

        lr = build_schedule(args.lr_schedule)
    return optim.Adam(learning_rate=lr)


def train_lora(model, train_set: list[Example], val_set: list[Example], args: LoRATrainingArgs,
               save: Callable[[str], None], report: Callable[[Report], None] = lambda r: None) -> list[float]:
    """Train the LoRA parameters of `model` (see `lora.apply_lora`) for `args.iters` steps.

    `save(path)` writes the adapter (to `args.adapter_file` at the end, to numbered files
    beside it every `save_every` iterations); `report` sees the progress. Ctrl-C saves the
    adapter and raises `TrainingInterrupted`. Returns every step's loss.
    """
    detach_routers(model)
    L, pad = model.args.canvas_length, model.args.pad_token_id
    batches = iterate_batches(train_set, args.batch_size, L, pad, args.seed, **_batch_kw(model, args))
    optimizer = make_optimizer(args)
    loss_and_grad = nn.value_and_grad(model, lora_loss)
    rng, key = random.Random(args.seed), mx.random.key(args.seed)
    losses, window, window_toks, trained = [], [], 0, 0
    mx.reset_peak_memory()
    tic = start = time.perf_counter()
    it = 0
    try:
        for it in range(1, args.iters + 1):
            if val_set and args.steps_per_eval and it == 1:
                tic += _validate(model, val_set, args, 0, report)
            model.train()
            key, step_key = mx.random.split(key)
            loss, toks = _step(model, loss_and_grad, optimizer, batches, rng, step_key, args)
            losses.append(loss)
            window.append(loss)
            window_toks += toks
            trained += toks
            if it % args.steps_per_report == 0 or it == args.iters:
                elapsed = time.perf_counter() - tic
                report(Report("train", it, loss=sum(window) / len(window), learning_rate=_lr(optimizer),
                              its_per_sec=len(window) / elapsed, tokens_per_sec=window_toks / elapsed,
                              trained_tokens=trained, peak_memory_gb=mx.get_peak_memory() / 1e9,
                              seconds=time.perf_counter() - start))
                window, window_toks, tic = [], 0, time.perf_counter()
            else:
                report(Report("step", it, loss=loss, trained_tokens=trained,
                              peak_memory_gb=mx.get_peak_memory() / 1e9))
            if val_set and args.steps_per_eval and (it % args.steps_per_eval == 0 or it == args.iters):
                tic += _validate(model, val_set, args, it, report)
            if args.save_every and it % args.save_every == 0 and it < args.iters:
                path = numbered(args.adapter_file, it)
                save(path)
                report(Report("save", it, path=path))
    except KeyboardInterrupt:
        save(args.adapter_file)
        raise TrainingInterrupted(it, args.adapter_file) from None
    save(args.adapter_file)
    report(Report("save", args.iters, path=args.adapter_file))
    model.eval()
    return losses


def _validate(model, val_set, args: LoRATrainingArgs, it: int, report) -> float:
    """Report the validation loss after iteration `it`; returns the seconds it took."""
    t0 = time.perf_counter()
    loss = evaluate(model, val_set, args, args.val_batches)
    seconds = time.perf_counter() - t0
    report(Report("val", it, loss=loss, seconds=seconds))
    return seconds


def _step(model, loss_and_grad, optimizer, batches, rng, key, args) -> tuple[float, int]:
    """One optimizer update over `grad_accumulation_steps` batches (mean gradient)."""
    grads_sum, loss_sum, toks_sum = None, 0.0, 0
    keys = mx.random.split(key, args.grad_accumulation_steps)
    for micro in range(args.grad_accumulation_steps):
        batch = next(batches)
        sub = keys[micro]
        sc = rng.random() < args.objective.self_conditioning_rate
        (loss, toks), grads = loss_and_grad(model, batch, sub, sc, args.objective)
        grads_sum = grads if grads_sum is None else _tree_add(grads_sum, grads)
        mx.eval(loss, toks, grads_sum)
        loss_sum += loss.item()
        toks_sum += toks.item()
    n = args.grad_accumulation_steps
    if n > 1:
        grads_sum = _tree_scale(grads_sum, 1.0 / n)
    optimizer.update(model, grads_sum)
    mx.eval(model.parameters(), optimizer.state)
    return loss_sum / n, toks_sum


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, s: float):
    from mlx.utils import tree_map

    return tree_map(lambda x: x * s, a)


def _lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return lr.item() if isinstance(lr, mx.array) else float(lr)


def numbered(adapter_file: str, it: int) -> str:
    """`adapters.safetensors` -> `0000100_adapters.safetensors`, as mlx-lm names checkpoints."""
    from pathlib import Path

    p = Path(adapter_file)
    return str(p.with_name(f"{it:07d}_{p.name}"))


def format_report(r: Report) -> str:
    """mlx-lm's progress line for a report."""
    if r.kind == "val":
        return f"Iter {r.iteration}: Val loss {r.loss:.3f}, Val took {r.seconds:.3f}s"
    if r.kind == "save":
        return f"Iter {r.iteration}: Saved adapter weights to {r.path}."
    if r.kind == "step":
        return f"Iter {r.iteration}: loss {r.loss:.3f}, trained tokens {r.trained_tokens}, peak mem {r.peak_memory_gb:.3f} GB"
    return (f"Iter {r.iteration}: Train loss {r.loss:.3f}, Learning Rate {r.learning_rate:.3e}, "
            f"It/sec {r.its_per_sec:.3f}, Tokens/sec {r.tokens_per_sec:.3f}, "
            f"Trained Tokens {r.trained_tokens}, Peak mem {r.peak_memory_gb:.3f} GB")


def print_report(r: Report, stream=None) -> None:
    """Print a report: per-iteration ones on a live line (terminals only), others for good."""
    stream = stream or sys.stdout
    live = stream.isatty()
    if r.kind == "step":
        if live:
            print("\r\033[K" + format_report(r), end="", file=stream, flush=True)
        return
    print(("\r\033[K" if live else "") + format_report(r), file=stream, flush=True)
