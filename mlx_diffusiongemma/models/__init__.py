"""The DiffusionGemma model family: `config` (ModelArgs from config.json, validated),
`diffusion_gemma` (the MLX model), `cache` (encoder KV caches), `vision` (the vision tower)."""

from .config import ModelArgs
from .diffusion_gemma import Model

__all__ = ["Model", "ModelArgs"]
