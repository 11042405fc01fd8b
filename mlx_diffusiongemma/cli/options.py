"""Options shared by the commands, named after `GenerationSettings`, and model loading."""

import math
from typing import Annotated

import typer

from ..chat import ChatSession
from ..errors import UserError
from ..generate import REFERENCE_DEFAULTS, SAMPLERS
from ..weights.hub import DEFAULT_MODEL


def _positive(value: float | None) -> float | None:
    # A callback rather than `min=`: the help would show `x>=0.0`, but 0 is refused too;
    # click's float also takes "inf" and "nan", which no setting can use.
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number > 0.")
    return value


def _probability(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 < value <= 1):
        raise typer.BadParameter(f"{value} is not a probability in (0, 1].")
    return value


def _sampler(value: str | None) -> str | None:
    if value is not None and value not in SAMPLERS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(SAMPLERS)}.")
    return value


def seed_option(value: int | None) -> int | None:
    # MLX's PRNG keys take 64 bits; refused rather than wrapped, so a seed means one thing.
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise typer.BadParameter(f"{value} is outside [0, 2**64); pick a seed from 0 to {SEED_LIMIT - 1}.")
    return value


def _stops(values: list[str] | None) -> list[str] | None:
    if values and "" in values:
        raise typer.BadParameter("an empty stop string would end every reply at once; give some text.")
    return values


SEED_LIMIT = 2**64


# Sampling defaults come from the model's generation_config.json, else the reference's.
_FROM_CONFIG = "model's or {}"

ModelOption = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model directory or Hugging Face repo id.", show_default=DEFAULT_MODEL)]
AdapterPathOption = Annotated[str | None, typer.Option(
    help="LoRA adapter directory (from `mlx-diffusiongemma lora`) to apply to the model.", show_default="none")]
MaxTokensOption = Annotated[int | None, typer.Option(
    min=1, help="Most tokens to generate; whole canvases are written.",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["max_tokens"]))]
StepsOption = Annotated[int | None, typer.Option(
    "--steps", min=1, help="Most denoising steps per canvas.",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["max_denoising_steps"]))]
TMinOption = Annotated[float | None, typer.Option(
    callback=_positive, help="Temperature of the last denoising step.",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["t_min"]))]
TMaxOption = Annotated[float | None, typer.Option(
    callback=_positive, help="Temperature of the first denoising step (must exceed --t-min).",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["t_max"]))]
EntropyOption = Annotated[float | None, typer.Option(
    callback=_positive, help="Entropy budget (nats) for accepting sampled tokens each step.",
    show_default=_FROM_CONFIG.format(REFERENCE_DEFAULTS["entropy_bound"]))]
SeedOption = Annotated[int | None, typer.Option(
    callback=seed_option, help="Random seed for reproducible output, 0 to 2**64-1.", show_default="a fresh seed each run")]
SystemOption = Annotated[str | None, typer.Option(help="System prompt.", show_default="none")]
ThinkOption = Annotated[bool, typer.Option(
    "--think/--no-think", help="Let the model think before answering.")]
StopOption = Annotated[list[str] | None, typer.Option(
    "--stop", callback=_stops, help="End the reply where this text appears, cutting it (repeatable).", show_default="none")]
ImageOption = Annotated[list[str] | None, typer.Option(
    "--image", help="An image file to show the model with the prompt (repeatable); loads the vision tower.",
    show_default="none")]


FastOption = Annotated[bool, typer.Option(
    "--fast", help="Fast mode: at most 14 denoising steps, the temperature schedule compressed to them "
                   "(GenerationSettings.fast; benchmarks/README.md measures it).")]
SamplerOption = Annotated[str | None, typer.Option(
    callback=_sampler, help="entropy: the reference's entropy budget; confidence: reveal and hold a position once "
    "its draw has probability >= --threshold (mlx-vlm's rule).", show_default="entropy")]
ThresholdOption = Annotated[float | None, typer.Option(
    callback=_probability, help="Probability a draw needs to be revealed by --sampler confidence.",
    show_default="0.9")]
TopKOption = Annotated[int | None, typer.Option(
    min=0, help="Build self-conditioning from each position's k likeliest tokens (0: the whole vocabulary).",
    show_default="0")]
FullCanvasOption = Annotated[bool | None, typer.Option(
    "--full-canvas/--cut-canvas", help="Write whole canvases (the reference) or cut the last one to what remains "
    "of --max-tokens (mlx-vlm's rule; exactly --max-tokens written).", show_default="--full-canvas")]
MinCanvasOption = Annotated[int | None, typer.Option(
    min=1, help="With --cut-canvas, the fewest positions a cut canvas keeps.", show_default="64")]


def speed_settings(fast: bool, sampler: str | None = None, threshold: float | None = None,
                   self_conditioning_top_k: int | None = None, full_canvas: bool | None = None,
                   min_canvas_length: int | None = None) -> dict:
    """The `GenerationSettings` overrides the speed options give (none when left out)."""
    given = dict(sampler=sampler, threshold=threshold, self_conditioning_top_k=self_conditioning_top_k,
                 full_canvas=full_canvas, min_canvas_length=min_canvas_length)
    return {**(dict(fast=True) if fast else {}), **{k: v for k, v in given.items() if v is not None}}


def settings_from(max_tokens, steps, t_min, t_max, entropy_bound, seed) -> dict:
    """The `GenerationSettings` overrides the shared options give."""
    if t_min is not None and t_max is not None and t_max <= t_min:
        raise UserError(f"--t-max ({t_max}) must be greater than --t-min ({t_min})")
    return dict(max_tokens=max_tokens, max_denoising_steps=steps, t_min=t_min, t_max=t_max,
                entropy_bound=entropy_bound, seed=seed)


def load_model_option(model: str | None, adapter_path: str | None = None, text_only: bool = True):
    """`(model, tokenizer)` of --model (with --adapter-path applied), the mlx-community
    4-bit conversion by default."""
    # Imported here so `--help` does not pay for importing mlx-lm and transformers.
    from ..loading import load

    if model is not None:
        return load(model, adapter_path=adapter_path, text_only=text_only)
    try:
        return load(DEFAULT_MODEL, adapter_path=adapter_path, text_only=text_only)
    except UserError as e:
        raise UserError(f"{e} (no --model given: the default is {DEFAULT_MODEL}; "
                        "`mlx-diffusiongemma sudoku` runs the offline demo)") from None


def session_for(model, settings: dict, system, think, stop, keep=None, adapter_path=None, text_only=True):
    """A `ChatSession` on --model (and --adapter-path) with the given settings."""
    model, tokenizer = load_model_option(model, adapter_path, text_only)
    return ChatSession(model, tokenizer, system=system, thinking=think, stop=stop or (),
                       keep=keep, **settings)
