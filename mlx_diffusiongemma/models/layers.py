"""Layers shared by the text stack and the vision tower."""

import mlx.core as mx
import mlx.nn as nn


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    # Gemma 4 multiplies by `weight` (not 1 + weight); the fast kernel accumulates in fp32.
    return mx.fast.rms_norm(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)
