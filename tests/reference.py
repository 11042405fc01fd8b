"""Tiny random DiffusionGemma checkpoints written by the transformers reference itself."""

from pathlib import Path

import numpy as np
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from mlx_diffusiongemma.models.tiny import tiny_config as tiny_config_dict

def tiny_config(canvas_length: int = 8, **text) -> DiffusionGemmaConfig:
    """The reference's config for `mlx_diffusiongemma.models.tiny.tiny_config`."""
    config = tiny_config_dict(canvas_length, **text)
    return DiffusionGemmaConfig(text_config=config["text_config"], vision_config=config["vision_config"],
                                canvas_length=canvas_length)


def randomize(model: DiffusionGemmaForBlockDiffusion, seed: int, scale: float = 1.0) -> None:
    """Give every weight, norm and scalar a distinct random value.

    Norm weights away from 1 catch `w` vs `1 + w`; encoder and decoder layer scalars
    differ; a larger embedding scale makes logits decisive so low-temperature sampling is
    the argmax on both sides.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention has scale 1.0: modest q/k norms keep scores well conditioned, so
                # float32 rounding stays far below the parity tolerance.
                p.copy_(0.3 + 0.3 * torch.rand(p.shape, generator=g))
            elif name.endswith(("norm.weight", ".scale")) or "layernorm" in name:
                p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=g))
            elif "per_expert_scale" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=g))


def make_reference(path: Path, seed: int = 0, canvas_length: int = 8, embed_scale: float = 1.0,
                   shard: str = "40KB", **text) -> DiffusionGemmaForBlockDiffusion:
    """Build, randomize and `save_pretrained` a float32 reference model into `path`."""
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(tiny_config(canvas_length, **text)).eval()
    randomize(model, seed, embed_scale)
    model.save_pretrained(path, max_shard_size=shard)
    return model


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest logit difference over the largest logit magnitude.

    Float32 rounding grows with the logits' scale and differs between CPUs' kernels: on the
    larger test configs the float32 reference is itself up to 4e-6 (relative) away from its
    float64 run, and one CI machine measured 2.5e-5. Real port or conversion errors (a
    transposed weight, a norm offset, a wrong mask) are above 1e-2.
    """
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())
