"""`mlx-diffusiongemma convert`: a Hugging Face checkpoint to an MLX model directory."""

import warnings
from pathlib import Path
from typing import Annotated

import typer

from ..ui.progress import ProgressBar
from ..weights.atomic import OutputExists
from .app import EXIT_INTERRUPTED, app, error, info, one_line


@app.command()
def convert(
    hf_path: Annotated[str, typer.Argument(help="Hugging Face checkpoint: directory or repo id.")],
    mlx_path: Annotated[Path, typer.Argument(help="Output directory for the MLX model.")],
    quantize: Annotated[bool, typer.Option(
        "--quantize/--no-quantize", help="Quantize the weights (see --recipe).")] = True,
    q_bits: Annotated[int, typer.Option(help="Bits of the quantized experts (2, 3, 4, 5, 6 or 8).")] = 4,
    q_group_size: Annotated[int, typer.Option(help="Quantization group size (32, 64 or 128).")] = 64,
    recipe: Annotated[str, typer.Option(
        help="'mixed': experts at --q-bits, the rest at 8 bits; '8bit': everything at 8 bits.")] = "mixed",
    dtype: Annotated[str | None, typer.Option(
        help="Float type of unquantized tensors and scales: bfloat16, float16 or float32.",
        show_default="the checkpoint's own")] = None,
    text_only: Annotated[bool, typer.Option("--text-only", help="Leave the vision tower out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
):
    """Convert a Hugging Face DiffusionGemma checkpoint to an MLX model directory."""
    from ..convert import convert as run_conversion  # deferred: --help stays fast

    try:
        with warnings.catch_warnings(record=True) as caught, ProgressBar("Converting") as progress:
            warnings.simplefilter("always")
            out = run_conversion(
                hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
                recipe=recipe, dtype=dtype, text_only=text_only, overwrite=overwrite, progress=progress,
            )
    except OutputExists as e:
        raise OutputExists(f"{e} (--overwrite)") from None
    except KeyboardInterrupt:
        error(f"conversion interrupted; nothing was written to {mlx_path}; run it again")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for w in caught:
        info(f"warning: {one_line(w.message)}")
    print(f"converted model written to {out}")


