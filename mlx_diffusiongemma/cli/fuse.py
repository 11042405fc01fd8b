"""`mlx-diffusiongemma fuse`: fold a LoRA adapter into the model's weights and write an
ordinary model directory (`mlx_lm.fuse`'s options)."""

from typing import Annotated

import typer

from .app import app, info


@app.command()
def fuse(
    model: Annotated[str, typer.Option("--model", "-m", help="The base model the adapter was trained on.")],
    adapter_path: Annotated[str, typer.Option(help="Adapter directory (adapters.safetensors + "
                                              "adapter_config.json).")] = "adapters",
    save_path: Annotated[str, typer.Option(help="Output model directory.")] = "fused_model",
    dequantize: Annotated[bool, typer.Option(
        "--dequantize", help="Write plain (unquantized) weights; otherwise quantized layers are re-quantized "
                             "with their own bits.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --save-path.")] = False,
):
    """Fuse an adapter into its base model; generate, chat and lora load the result."""
    from ..loading import load
    from ..tuner.lora import fuse as fuse_model
    from ..tuner.lora import save_model

    # The vision tower, if any, is kept: the output is a whole model.
    model_obj, _ = load(model, text_only=False, adapter_path=adapter_path)
    fuse_model(model_obj, dequantize=dequantize)
    out = save_model(model_obj, model, save_path, overwrite=overwrite)
    info(f"Fused model saved to {out}")
