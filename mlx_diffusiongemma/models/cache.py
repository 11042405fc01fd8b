"""Encoder KV caches.

The causal encoder appends to these; the bidirectional canvas decoder only reads them.
Full-attention layers keep every position. Sliding layers attend to the last
`window - 1` cached positions (exactly what the reference's sliding cache keeps) but may
store more (`keep`), so a chat can step back to an earlier prefix without re-encoding.
"""

import mlx.core as mx


class FullCache:
    """Keys and values of every encoded position, shape (B, kv_heads, T, head_dim)."""

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    @property
    def start(self) -> int:
        """Absolute position of the first stored entry."""
        return 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append new keys/values; return everything this layer's queries may attend to."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values

    def fetch(self) -> tuple[mx.array | None, mx.array | None]:
        """What a canvas attends to besides itself."""
        return self.keys, self.values

    def can_trim_to(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def trim_to(self, n: int) -> None:
        """Forget every position from `n` on."""
        if not self.can_trim_to(n):
            raise ValueError(f"cannot trim a cache of {self.offset} positions to {n}")
        if n < self.offset:
            self.keys, self.values = self.keys[:, :, :n], self.values[:, :, :n]
            self.offset = n

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class SlidingCache(FullCache):
    """Keys and values of the last `keep` positions; a query sees at most `window` keys."""

    def __init__(self, window: int, keep: int | None = None):
        super().__init__()
        self.window = window
        self.keep = max(keep or 0, window - 1)

    @property
    def start(self) -> int:
        return self.offset - (0 if self.keys is None else self.keys.shape[2])

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # Queries of this chunk look back `window - 1` positions from the chunk's first token.
        prefix_k, prefix_v = self.fetch()
        if prefix_k is not None:
            keys_all = mx.concatenate([prefix_k, keys], axis=2)
            values_all = mx.concatenate([prefix_v, values], axis=2)
        else:
            keys_all, values_all = keys, values
        stored_k, stored_v = super().update_and_fetch(keys, values)
        self.keys, self.values = stored_k[:, :, -self.keep :], stored_v[:, :, -self.keep :]
        return keys_all, values_all

    def fetch(self) -> tuple[mx.array | None, mx.array | None]:
        if self.keys is None:
            return None, None
        n = self.window - 1
        return self.keys[:, :, -n:], self.values[:, :, -n:]

    def can_trim_to(self, n: int) -> bool:
        # Trimming back to n needs the `window - 1` positions before n to still be stored.
        return 0 <= n <= self.offset and (n == 0 or self.start <= max(0, n - (self.window - 1)))

    def trim_to(self, n: int) -> None:
        if not self.can_trim_to(n):
            raise ValueError(f"cannot trim a sliding cache holding [{self.start}, {self.offset}) to {n}")
        if n == 0:
            self.keys = self.values = None
            self.offset = 0
        elif n < self.offset:
            drop = self.offset - n
            self.keys, self.values = self.keys[:, :, :-drop], self.values[:, :, :-drop]
            self.offset = n


def cache_length(cache: list) -> int:
    """Number of positions encoded so far."""
    return cache[0].offset if cache else 0


def can_trim_cache(cache: list, n: int) -> bool:
    """Whether every layer can step back to the first `n` positions."""
    return all(c.can_trim_to(n) for c in cache)


def trim_cache(cache: list, n: int) -> None:
    """Step every layer back to the first `n` positions (see `can_trim_cache`)."""
    for c in cache:
        c.trim_to(n)
