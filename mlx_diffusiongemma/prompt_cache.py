"""An encoder cache that remembers which tokens it holds, so the next prompt encodes only
what differs: the chat session and the server both reuse prefixes through it."""

from collections.abc import Sequence

from .models.cache import can_trim_cache, trim_cache

# Slack for the tokens after the common prefix that belong to the previous prompt
# (the generation prompt's empty thought block), on top of the reply's canvases.
_PROMPT_TAIL_SLACK = 64


def reply_keep(args, max_tokens: int) -> int:
    """Positions for sliding layers to keep (`PromptCache`'s `keep`) so that the next turn
    can step back over a reply of `max_tokens` (written as whole canvases) and the window."""
    canvases = -(-max_tokens // args.canvas_length)
    return args.sliding_window - 1 + canvases * args.canvas_length + _PROMPT_TAIL_SLACK


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """A model's per-layer encoder cache and `ids`, the tokens encoded into it.

    `keep` is how many positions sliding-attention layers store (see `Model.make_cache`):
    more than the window lets `reuse` step back over earlier tokens without re-encoding.
    """

    def __init__(self, model, keep: int | None = None):
        self.model, self.keep = model, keep
        self.clear()

    def clear(self) -> None:
        """Start from an empty cache."""
        self.cache = self.model.make_cache(keep=self.keep)
        self.ids: list[int] = []

    def reuse(self, ids: Sequence[int]) -> int:
        """Step the cache back to the longest prefix it shares with `ids` and return its
        length (at most `len(ids) - 1`, so at least one token is left to encode).

        When a sliding layer no longer stores enough positions to step back that far, the
        cache starts over and 0 is returned.
        """
        n = min(common_prefix(self.ids, ids), len(ids) - 1)
        if n <= 0 or not can_trim_cache(self.cache, n):
            self.clear()
            return 0
        trim_cache(self.cache, n)
        self.ids = list(self.ids[:n])
        return n

    def record(self, ids: Sequence[int]) -> None:
        """Declare that the cache now holds `ids`; a cache whose layers disagree with that
        (an interrupt inside an encoder pass) is cleared instead."""
        if all(c.offset == len(ids) for c in self.cache):
            self.ids = list(ids)
        else:
            self.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(c.nbytes for c in self.cache)
