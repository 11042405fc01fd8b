"""What the benchmark scripts share: where the released checkpoint's metadata lives, and
how a random reference checkpoint is written."""

from pathlib import Path

# Byte-exact copies of the release's config.json, generation_config.json and index, plus
# the inferred tensor shapes (tests/data/README.md).
RELEASE = Path(__file__).resolve().parents[1] / "tests" / "data" / "diffusiongemma-26B-A4B-it"


def save_random_reference(path: Path, canvas_length: int, shape: dict) -> Path:
    """A random transformers DiffusionGemma of the shared tiny config at `shape`'s sizes
    (seed 0; its tiny vision tower keeps the checkpoint small), `save_pretrained` to `path`."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from mlx_diffusiongemma.models.tiny import tiny_config

    torch.manual_seed(0)
    tiny = tiny_config(canvas_length, **shape)
    config = DiffusionGemmaConfig(text_config=tiny["text_config"], vision_config=tiny["vision_config"],
                                  canvas_length=canvas_length)
    DiffusionGemmaForBlockDiffusion(config).eval().save_pretrained(path)
    return path
