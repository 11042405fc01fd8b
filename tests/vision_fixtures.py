"""A tiny random DiffusionGemma with a vision tower and a Gemma-4-style tokenizer whose
chat template writes image parts, saved as a model directory: for the vision tests and
the server's image tests."""

import base64
import io

import numpy as np
import torch
from PIL import Image
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from mlx_diffusiongemma.models.tiny import tiny_config
from reference import randomize

PATCH = 4
BUDGET = 70  # soft tokens per image at most: up to 630 patches of 4 x 4 pixels
CANVAS = 8


def picture(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    # Smooth gradients plus noise: bicubic resizing over- and undershoots on both.
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 255 // max(w - 1, 1) + y * 128 // max(h - 1, 1))[..., None] % 256
    pixels = (base + rng.randint(0, 60, (h, w, channels))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(image: Image.Image) -> str:
    """The image as a `data:` URL, as an OpenAI client sends it."""
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def image_tokenizer(path) -> dict:
    """A Gemma-4-style tokenizer whose template writes image content parts as `<|image|>`;
    returns the ids of boi, image and eoi."""
    from mlx_diffusiongemma.demos.sudoku.tokenizer import build_tokenizer
    from tokenizers import Tokenizer

    build_tokenizer(path, extra_tokens=["<|image>", "<|image|>", "<image|>"], vocab_size=512)
    template = (path / "chat_template.jinja").read_text()
    text_only = """{%- if part['type'] != 'text' -%}
                {{- raise_exception('Only text content is supported, got: ' ~ part['type']) -}}
            {%- endif -%}
            {{- part['text'] | trim -}}"""
    assert text_only in template
    with_images = "{%- if part['type'] == 'image' -%}{{- '<|image|>' -}}{%- else -%}{{- part['text'] | trim -}}{%- endif -%}"
    (path / "chat_template.jinja").write_text(template.replace(text_only, with_images))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return {name: tok.token_to_id(t) for name, t in
            (("boi", "<|image>"), ("image", "<|image|>"), ("eoi", "<image|>"))}


def vision_chat_model(path) -> dict:
    """Write the model directory to `path`; returns the ids of boi, image and eoi."""
    ids = image_tokenizer(path)
    cfg = tiny_config(CANVAS, vocab_size=512, sliding_window=16)
    vision = dict(cfg["vision_config"], patch_size=PATCH, pooling_kernel_size=3, position_embedding_size=256)
    config = DiffusionGemmaConfig(text_config=cfg["text_config"], vision_config=vision, canvas_length=CANVAS,
                                  image_token_id=ids["image"], boi_token_id=ids["boi"], eoi_token_id=ids["eoi"],
                                  vision_soft_tokens_per_image=BUDGET)
    torch.manual_seed(0)
    ref = DiffusionGemmaForBlockDiffusion(config).eval()
    randomize(ref, 0, 0.6)
    ref.save_pretrained(path)
    image_tokenizer(path)  # save_pretrained leaves the tokenizer files alone; rewrite to be sure
    return ids
