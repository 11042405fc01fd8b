"""The sampler step on vocabulary shards: each rank holds a slice of every position's
logits, and softmax, entropy, argmax and the categorical draw are combined from per-shard
partials (an all-gather of four numbers per position and rank, and an all-sum of one
count), never from gathered logits.

Every rank derives the same global values from the same gathered partials, so routing,
acceptance and the next canvas agree bit for bit across ranks.
"""

import mlx.core as mx

from .models.sharding import VocabShard, all_gather, all_sum
from .sample import accept_mask, renoise


@mx.compile
def shard_partials(scaled: mx.array) -> tuple[mx.array, mx.array]:
    """exp(scaled - m) and the partials (..., 4): local max m, sum of exp, sum of
    exp * (z - m) (centred, so the entropy avoids cancelling large terms), local argmax
    (as float32: exact for any vocabulary under 2**24)."""
    m = scaled.max(axis=-1, keepdims=True)
    shifted = scaled - m
    e = mx.exp(shifted)
    parts = [m, e.sum(axis=-1, keepdims=True), (e * shifted).sum(axis=-1, keepdims=True),
             mx.argmax(scaled, axis=-1, keepdims=True).astype(mx.float32)]
    return e, mx.concatenate(parts, axis=-1)


@mx.compile
def combine_partials(stats: mx.array, starts: mx.array):
    """From every rank's partials (N, ..., 4): each rank's share of the probability mass
    (N, ...), the global entropy H = logsumexp(z) - E_p[z] and the global argmax (...)."""
    m, S, T, idx = stats[..., 0], stats[..., 1], stats[..., 2], stats[..., 3]
    M = m.max(axis=0)
    w = mx.exp(m - M)
    total = (S * w).sum(axis=0)
    # With M the global max: H = log(total) - E_p[z - M], each rank's share re-centred on M.
    entropy = mx.log(total) - (w * (T + (m - M) * S)).sum(axis=0) / total
    # argmax over ranks takes the first rank on ties, like argmax over the whole vocabulary.
    winner = mx.argmax(m, axis=0)[None]
    ids = idx.astype(mx.int32) + starts.reshape(-1, *([1] * (idx.ndim - 1)))
    argmax = mx.take_along_axis(ids, winner, axis=0)[0]
    return S * w / total, mx.maximum(entropy, 0.0), argmax


def sharded_sample(probs: mx.array, shares: mx.array, rank: int, key: mx.array, vocab: VocabShard) -> mx.array:
    """One draw per position by inverting the global CDF: every rank counts its entries
    whose global CDF lies below the same uniform number; the counts add up to the index."""
    offset = shares[:rank].sum(axis=0)[..., None]
    cdf = offset + mx.cumsum(probs, axis=-1)
    u = mx.random.uniform(shape=(*probs.shape[:-1], 1), key=key) * shares.sum(axis=0)[..., None]
    count = all_sum((cdf < u).sum(axis=-1).astype(mx.int32), vocab.group)
    return mx.minimum(count, vocab.size - 1).astype(mx.int32)


def sharded_sampler_step(logits: mx.array, inv_t: mx.array, bound: mx.array, keys: mx.array,
                         pinned: mx.array, vocab: VocabShard):
    """`sample.sampler_step` for a rank holding `logits` (B, L, V/N), this rank's vocabulary
    slice. Returns the same tuple; `scaled` and `probs` are this rank's slices."""
    scaled = logits * inv_t
    e, partials = shard_partials(scaled)
    shares, entropy, argmax = combine_partials(all_gather(partials, vocab.group), vocab.starts)
    rank = vocab.group.rank()
    probs = e * (shares[rank] / e.sum(axis=-1))[..., None]
    sampled = sharded_sample(probs, shares, rank, keys[0], vocab)
    accepted = accept_mask(mx.where(pinned, 0.0, entropy), bound)
    next_canvas = renoise(sampled, accepted, vocab.size, keys[1])
    return scaled, probs, argmax.astype(mx.int32), next_canvas, accepted, entropy
