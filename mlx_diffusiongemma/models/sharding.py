"""Tensor parallelism over an `mx.distributed` group.

A `ShardPlan` says, for every weight that is split, which rows or columns of it each rank
keeps: attention by heads (a rank keeps the KV heads its queries read, so KV heads are
replicated where there are fewer than ranks), the dense MLP and every routed expert along
their inner width, and the tied embedding / LM head by vocabulary. Everything else (norms,
scalars, router, self-conditioning, vision) is replicated. `apply_plan` cuts a model's
arrays in place; the sharded loader reads the same pieces from disk.

Inner widths are cut into equal chunks of whole quantization groups, the last rank's chunk
zero-padded (704 over 2 ranks at group 64: 384 + 320 + 64 zeros). Zero rows of gate/up and
zero columns of down contribute exactly nothing, quantized or not (scale 0, bias 0).

Per layer the ranks exchange two all-sums: attention's output projection, and the dense
and expert branches stacked in one call (each is normalised before it is added, so neither
can be summed later). This module must not import `diffusion_gemma` (it imports us).
"""

import os
import sys
import traceback
from collections import Counter
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError

# Bytes handed to collectives in this process, by kind (for benchmarks; never reset here).
TRAFFIC: Counter = Counter()


def all_sum(x: mx.array, group) -> mx.array:
    """Sum of `x` over the ranks of `group`; `x` itself when `group` is None."""
    if group is None:
        return x
    TRAFFIC["all_sum"] += x.nbytes
    TRAFFIC["all_sum_calls"] += 1
    return mx.distributed.all_sum(x, group=group)


def all_gather(x: mx.array, group) -> mx.array:
    """Every rank's `x` stacked along a new first axis (N, ...)."""
    TRAFFIC["all_gather"] += x.nbytes
    TRAFFIC["all_gather_calls"] += 1
    return mx.distributed.all_gather(x[None], group=group)


def sum_pair(a: mx.array, b: mx.array, group) -> tuple[mx.array, mx.array]:
    """Two partial sums reduced in one collective call."""
    if group is None:
        return a, b
    both = all_sum(mx.stack([a, b.astype(a.dtype)]), group)
    return both[0], both[1].astype(b.dtype)


def broadcast(x: mx.array, group) -> mx.array:
    """Rank 0's `x` on every rank (an all-sum of it and zeros)."""
    if group is None:
        return x
    return all_sum(x if group.rank() == 0 else mx.zeros_like(x), group)


def world_group():
    """The launch's group when this process runs under `mlx.launch` with 2+ ranks, else None."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of one axis, zero-padded to `size`."""

    start: int
    stop: int
    size: int


@dataclass(frozen=True)
class Cut:
    """How one linear or embedding layer is split: along its output rows or input columns."""

    axis: str  # "rows" (output features, vocabulary) or "cols" (input features)
    pieces: tuple[Piece, ...]


@dataclass
class VocabShard:
    """This rank's rows [start, stop) of the tied embedding / LM head of `size` tokens.

    Logits come out as this rank's vocabulary slice; lookups and probs @ E are partial sums.
    """

    start: int
    stop: int
    size: int
    group: object

    @property
    def starts(self) -> mx.array:
        """The first token id of every rank's slice, (N,)."""
        N = self.group.size()
        per = -(-self.size // N)
        return mx.array([min(r * per, self.size) for r in range(N)], dtype=mx.int32)

    def softmax(self, x: mx.array) -> mx.array:
        """This rank's slice of softmax(x) over the whole vocabulary, from each rank's max
        and sum of exponentials (one small all-gather, never the logits themselves)."""
        m = x.max(axis=-1, keepdims=True)
        e = mx.exp(x - m)
        stats = all_gather(mx.concatenate([m, e.sum(axis=-1, keepdims=True)], axis=-1), self.group)
        M = stats[..., 0].max(axis=0)
        total = (stats[..., 1] * mx.exp(stats[..., 0] - M)).sum(axis=0)
        return e * (mx.exp(m[..., 0] - M) / total)[..., None]

    @property
    def smallest(self) -> int:
        """Entries of the smallest rank's slice (the last rank's)."""
        per = -(-self.size // self.group.size())
        return self.size - (self.group.size() - 1) * per

    def global_top_k(self, values: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
        """The k largest of every rank's k candidate `values` (..., k) and their global
        `ids`: the candidates are gathered (N k per position, never the logits), so each
        rank must offer its own k best (k at most `smallest`)."""
        k = values.shape[-1]
        values, ids = (mx.moveaxis(all_gather(a, self.group), 0, -2) for a in (values, ids))
        values, ids = values.reshape(*values.shape[:-2], -1), ids.reshape(*ids.shape[:-2], -1)
        pick = mx.argpartition(-values, kth=k - 1, axis=-1)[..., :k]
        return mx.take_along_axis(values, pick, axis=-1), mx.take_along_axis(ids, pick, axis=-1)

    def localize(self, ids: mx.array) -> tuple[mx.array, mx.array]:
        """`ids` as indices into this rank's slice (0 where outside it) and whether each is inside."""
        local = ids - self.start
        inside = (local >= 0) & (local < self.stop - self.start)
        return mx.where(inside, local, 0), inside

    def values_at(self, x: mx.array, ids: mx.array) -> mx.array:
        """x[..., ids] of a whole-vocabulary `x` (x's shape but the last axis) from this
        rank's slice: the rank that holds an id gives its value to an all-sum, the others 0."""
        local, inside = self.localize(ids)
        picked = mx.take_along_axis(x, local[..., None], axis=-1)[..., 0]
        return all_sum(mx.where(inside, picked, 0.0), self.group)

    def log_probs_of(self, x: mx.array, ids: mx.array) -> mx.array:
        """log softmax(x) over the whole vocabulary at `ids`, from this rank's slice `x`:
        each rank's log-sum-exp is gathered, the logits at `ids` come from `values_at`."""
        lse = mx.logsumexp(all_gather(mx.logsumexp(x, axis=-1), self.group), axis=0)
        return self.values_at(x, ids) - lse

    def embed(self, table: nn.Module, ids: mx.array) -> mx.array:
        """Embedding rows of `ids`: each rank looks up the ids it holds, zeros elsewhere,
        and the all-sum adds exactly one non-zero row per id (so it is exact)."""
        local, inside = self.localize(ids)
        rows = table(local)
        return all_sum(rows * inside[..., None].astype(rows.dtype), self.group)

    def local(self, x: mx.array) -> mx.array:
        """This rank's slice of a full-vocabulary last axis (a bias, a mask)."""
        return x[..., self.start : self.stop]


@dataclass
class ShardPlan:
    """The cuts of every split layer (by module path) for rank `rank` of `size` ranks."""

    rank: int
    size: int
    cuts: dict[str, Cut]
    heads: dict[int, tuple[int, int]]  # layer -> (query heads, KV heads) on this rank
    vocab: tuple[int, int]


def _chunks(width: int, ranks: int, rank: int, group: int) -> Piece:
    """Rank `rank`'s piece of `width` cut into equal chunks of whole `group`s."""
    chunk = -(-width // (ranks * group)) * group
    start = min(rank * chunk, width)
    return Piece(start, min(start + chunk, width), chunk)


def _group_size(module: nn.Module) -> int:
    return getattr(module, "group_size", 1) if "scales" in module else 1


def _head_split(layer: int, n_heads: int, n_kv: int, ranks: int, rank: int) -> tuple[int, int, int]:
    """(query heads per rank, first KV head, KV heads) for this rank, or a UserError."""
    if n_heads % ranks:
        raise UserError(
            f"cannot split {n_heads} attention heads across {ranks} ranks; "
            f"launch a number of ranks that divides {n_heads}"
        )
    hp, g = n_heads // ranks, n_heads // n_kv
    if hp % g and g % hp:
        raise UserError(
            f"layer {layer}: {ranks} ranks would split a group of {g} query heads sharing one KV head; "
            f"launch a number of ranks that divides {n_heads} and keeps whole groups"
        )
    first = rank * hp // g
    return hp, first, max(hp // g, 1)


def make_plan(model, ranks: int, rank: int) -> ShardPlan:
    """The cuts that give rank `rank` of `ranks` its part of `model` (full size, unsharded)."""
    args, cuts, heads = model.args, {}, {}
    for i, layer in enumerate(model.layers):
        p = f"model.decoder.layers.{i}"
        attn = layer.self_attn
        hp, kv0, nkv = _head_split(i, attn.n_heads, attn.n_kv, ranks, rank)
        D = attn.head_dim
        q = Piece(rank * hp * D, (rank + 1) * hp * D, hp * D)
        g = _group_size(attn.o_proj)
        if q.size % g:
            raise UserError(
                f"layer {i}: {hp} heads x {D} = {q.size} input features of o_proj per rank is not a whole "
                f"number of its quantization groups ({g}); launch fewer ranks or use a smaller group size"
            )
        cuts[f"{p}.self_attn.q_proj"] = Cut("rows", (q,))
        kv = Cut("rows", (Piece(kv0 * D, (kv0 + nkv) * D, nkv * D),))
        cuts[f"{p}.self_attn.k_proj"] = kv
        if "v_proj" in attn:
            cuts[f"{p}.self_attn.v_proj"] = kv
        cuts[f"{p}.self_attn.o_proj"] = Cut("cols", (q,))
        heads[i] = (hp, nkv)
        d = _chunks(args.intermediate_size, ranks, rank, _group_size(layer.mlp.down_proj))
        cuts[f"{p}.mlp.gate_proj"] = cuts[f"{p}.mlp.up_proj"] = Cut("rows", (d,))
        cuts[f"{p}.mlp.down_proj"] = Cut("cols", (d,))
        I = args.moe_intermediate_size
        e = _chunks(I, ranks, rank, _group_size(layer.experts.down_proj))
        # gate_up is fused: this rank's gate rows, then its up rows.
        cuts[f"{p}.experts.gate_up_proj"] = Cut("rows", (e, Piece(I + e.start, I + e.stop, e.size)))
        cuts[f"{p}.experts.down_proj"] = Cut("cols", (e,))
    # The vocabulary needs no padding: every rank's logits reduce to per-position partials.
    V = args.vocab_size
    per = -(-V // ranks)
    start, stop = min(rank * per, V), min((rank + 1) * per, V)
    if stop <= start:
        raise UserError(f"cannot split a vocabulary of {V} tokens across {ranks} ranks")
    cuts["model.decoder.embed_tokens"] = Cut("rows", (Piece(start, stop, stop - start),))
    return ShardPlan(rank, ranks, cuts, heads, (start, stop))


def array_cut(module: nn.Module, name: str, cut: Cut) -> tuple[int, tuple[Piece, ...]]:
    """(axis, pieces) of `cut` in the units of the module's array `name`: packed words for a
    quantized weight's columns, groups for its scales and biases."""
    if cut.axis == "rows":
        return (-1 if name == "bias" else -2), cut.pieces
    if name == "bias":
        # A column-split layer's bias would be added once per rank; this model has none.
        raise UserError(f"cannot split a biased layer along its input ({name})")
    per = 1
    if "scales" in module:
        per = 32 // module.bits if name == "weight" else module.group_size
    for p in cut.pieces:
        if p.start % per or p.stop % per or p.size % per:
            raise UserError(f"cannot cut {name} at {p} on {per}-element boundaries")
    return -1, tuple(Piece(p.start // per, p.stop // per, p.size // per) for p in cut.pieces)


def cut_array(x: mx.array, axis: int, pieces: tuple[Piece, ...]) -> mx.array:
    """The pieces of `x` along `axis`, each zero-padded to its size, concatenated."""
    if not pieces:
        return x
    axis = axis % x.ndim
    parts = []
    for p in pieces:
        index = [slice(None)] * x.ndim
        index[axis] = slice(p.start, p.stop)
        part = x[tuple(index)]
        if p.size > p.stop - p.start:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, p.size - (p.stop - p.start))
            part = mx.pad(part, pad)
        parts.append(part)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def apply_plan(model, plan: ShardPlan, group) -> None:
    """Cut `model`'s split layers to this rank's part and wire in the collectives."""
    modules = dict(model.named_modules())
    for path, cut in plan.cuts.items():
        module = modules[path]
        for name in [k for k in ("weight", "scales", "biases", "bias") if k in module]:
            if module[name] is None:
                continue
            axis, pieces = array_cut(module, name, cut)
            module[name] = cut_array(module[name], axis, pieces)
    for i, layer in enumerate(model.layers):
        layer.self_attn.n_heads, layer.self_attn.n_kv = plan.heads[i]
        layer.self_attn.group = group
        layer.group = group
    embed = model.model.decoder.embed_tokens
    if isinstance(embed, nn.QuantizedEmbedding):
        embed.num_embeddings = plan.vocab[1] - plan.vocab[0]
    model.model.decoder.vocab = VocabShard(*plan.vocab, model.args.vocab_size, group)


def shard(model, group) -> None:
    """Split a loaded (unsharded) `model` in place across `group`; see the module docstring."""
    apply_plan(model, make_plan(model, group.size(), group.rank()), group)


def silence_followers(group) -> None:
    """Ranks other than 0 print nothing, so a launch shows one copy of the output: their
    stdout goes nowhere and their stderr lets through only what is written while an
    exception is handled (the CLI's one-line errors) and uncaught tracebacks."""
    if group.rank() == 0:
        return
    sys.stdout = open(os.devnull, "w")
    stderr = sys.stderr
    sys.stderr = _ErrorsOnly(stderr)
    sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=stderr)


class _ErrorsOnly:
    """A stream that forwards writes made while an exception is being handled."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text) if sys.exc_info()[0] is not None else len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)
