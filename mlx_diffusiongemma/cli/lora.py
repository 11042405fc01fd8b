"""`mlx-diffusiongemma lora`: LoRA / QLoRA fine-tuning with the block-diffusion objective,
with `mlx_lm.lora`'s option names, data folder, adapter files and `-c config.yaml`."""

from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError, first_line
from ..tuner.args import LoRATrainingArgs, ObjectiveArgs
from .app import EXIT_INTERRUPTED, app, info

# LoRATrainingArgs fields built from other settings, not options of their own.
DERIVED = ("objective", "adapter_file")
# Defaults where nothing is given on the command line or in the config file: the
# loop's and the objective's are their dataclasses'.
DEFAULTS = dict(
    model=None, data="data", adapter_path="adapters", num_layers=16, test=False, test_batches=500,
    resume_adapter_file=None, lora_parameters=None, fine_tune_type="lora",
    **{f.name: f.default for f in fields(LoRATrainingArgs) if f.name not in DERIVED},
    **{f.name: f.default for f in fields(ObjectiveArgs)},
)
LORA_FIELDS = ("rank", "scale", "dropout", "keys")


def shown(name: str) -> str:
    """A default as `--help` shows it."""
    return str(DEFAULTS[name])


def read_config(path: Path) -> dict:
    """A YAML config of `mlx_lm.lora` keys (and the objective's), checked."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read config {path} ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise UserError(f"config {path} must be a mapping of option names to values")
    config = {k.replace("-", "_"): v for k, v in config.items()}
    unknown = sorted(set(config) - set(DEFAULTS) - {"train"})
    if unknown:
        raise UserError(f"config {path}: unknown key {unknown[0]!r}; the keys are mlx_lm.lora's "
                        f"({', '.join(sorted(DEFAULTS))})")
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"config {path}: fine_tune_type {config['fine_tune_type']!r} is not supported (only lora)")
    lora = config.get("lora_parameters") or {}
    if not isinstance(lora, dict) or set(lora) - set(LORA_FIELDS):
        raise UserError(f"config {path}: lora_parameters takes {', '.join(LORA_FIELDS)}")
    return config


def resolve(cli: dict, config_file: Path | None) -> dict:
    """Defaults < config file < options given on the command line."""
    config = read_config(config_file) if config_file else {}
    settings = {**DEFAULTS, **config, **{k: v for k, v in cli.items() if v is not None}}
    lora = dict(config.get("lora_parameters") or {})
    lora.update({k: cli[k] for k in LORA_FIELDS if cli.get(k) is not None})
    settings["lora_parameters"] = lora
    if settings["model"] is None:
        raise UserError("no model; pass --model (a model directory or Hugging Face repo id) or set model in the config")
    return settings


def training_args(s: dict):
    objective = ObjectiveArgs(**{f.name: s[f.name] for f in fields(ObjectiveArgs) if f.name in s})
    names = {f.name for f in fields(LoRATrainingArgs)} - set(DERIVED)
    return LoRATrainingArgs(**{k: s[k] for k in names}, objective=objective,
                            adapter_file=str(Path(s["adapter_path"]) / "adapters.safetensors"))


@app.command()
def lora(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model directory or Hugging Face repo id "
                                              "(quantized: QLoRA).", show_default="none")] = None,
    data: Annotated[str | None, typer.Option(help="Folder with train.jsonl, valid.jsonl, test.jsonl.",
                                             show_default=shown("data"))] = None,
    adapter_path: Annotated[str | None, typer.Option(help="Where adapters are saved (and read for --test).",
                                                     show_default=shown("adapter_path"))] = None,
    iters: Annotated[int | None, typer.Option(min=0, help="Training iterations (0: only --test).",
                                              show_default=shown("iters"))] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Examples per batch.",
                                                   show_default=shown("batch_size"))] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Adam learning rate.",
                                                        show_default=shown("learning_rate"))] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="LoRA rank.", show_default="8")] = None,
    scale: Annotated[float | None, typer.Option(help="LoRA scale (mlx-lm's: alpha / rank).",
                                                show_default="20.0")] = None,
    dropout: Annotated[float | None, typer.Option(min=0.0, max=0.99, help="LoRA dropout.",
                                                  show_default="0.0")] = None,
    keys: Annotated[list[str] | None, typer.Option(
        "--keys", help="Layer modules to adapt (repeatable), e.g. self_attn.q_proj, experts.gate_up_proj, "
                       "router.proj.", show_default="attention and dense MLP")] = None,
    num_layers: Annotated[int | None, typer.Option(help="Adapt the last N layers (-1: all).",
                                                   show_default=shown("num_layers"))] = None,
    mask_prompt: Annotated[bool | None, typer.Option(
        "--mask-prompt", help="Keep the prompt out of the encoder co-loss too (the canvas loss never "
                              "covers it).")] = None,
    grad_checkpoint: Annotated[bool | None, typer.Option(
        "--grad-checkpoint", help="Recompute each layer in the backward pass to save memory.")] = None,
    grad_accumulation_steps: Annotated[int | None, typer.Option(
        min=1, help="Batches per optimizer update.", show_default=shown("grad_accumulation_steps"))] = None,
    steps_per_report: Annotated[int | None, typer.Option(min=1, help="Iterations between loss reports.",
                                                         show_default=shown("steps_per_report"))] = None,
    steps_per_eval: Annotated[int | None, typer.Option(min=0, help="Iterations between validations (0: never).",
                                                       show_default=shown("steps_per_eval"))] = None,
    val_batches: Annotated[int | None, typer.Option(min=-1, help="Validation batches (-1: all).",
                                                    show_default=shown("val_batches"))] = None,
    test_batches: Annotated[int | None, typer.Option(min=-1, help="Test batches (-1: all).",
                                                     show_default=shown("test_batches"))] = None,
    save_every: Annotated[int | None, typer.Option(min=0, help="Save a numbered checkpoint every N iterations.",
                                                   show_default=shown("save_every"))] = None,
    resume_adapter_file: Annotated[str | None, typer.Option(help="Start from these adapter weights.",
                                                            show_default="none")] = None,
    max_seq_length: Annotated[int | None, typer.Option(
        min=1, help="Longest encoder prefix (prompt + earlier canvases), cut from the left.",
        show_default=shown("max_seq_length"))] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of the batches and noise.",
                                             show_default=shown("seed"))] = None,
    noise_exponent: Annotated[float | None, typer.Option(
        min=0.0, help="Corrupted fraction t = min + (1 - min) * u ** EXPONENT; below 1 leans to heavy noise.",
        show_default=shown("noise_exponent"))] = None,
    noise_min: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Least corrupted fraction.",
                                                    show_default=shown("noise_min"))] = None,
    self_conditioning_rate: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Share of steps trained with a detached self-conditioning pass.",
        show_default=shown("self_conditioning_rate"))] = None,
    pinned_rate: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Share of examples with \"pinned_spans\" trained with those tokens kept clean, "
        "as generation with pinned positions holds them.", show_default=shown("pinned_rate"))] = None,
    encoder_loss_weight: Annotated[float | None, typer.Option(
        min=0.0, help="Weight of the encoder's next-token co-loss (0: off).",
        show_default=shown("encoder_loss_weight"))] = None,
    test: Annotated[bool | None, typer.Option("--test", help="Report the loss on test.jsonl afterwards.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", exists=True, dir_okay=False,
                                                help="YAML file of these options (mlx_lm.lora's keys).",
                                                show_default="none")] = None,
):
    """Fine-tune a LoRA adapter (QLoRA on a quantized model) with the block-diffusion objective.

    Each example trains one canvas of its answer: the prompt and earlier canvases in the
    encoder cache, the canvas corrupted with uniform random tokens, the loss on its answer
    positions only. Progress as mlx_lm.lora prints it; Ctrl-C saves the adapter.
    """
    cli = {k: v for k, v in locals().items() if k != "config"}
    s = resolve(cli, config)
    from ..loading import load
    from ..tuner.datasets import load_dataset

    model_obj, tokenizer = load(s["model"])
    sets = load_dataset(s["data"], tokenizer)
    args = training_args(s)
    if s["iters"]:
        _train(model_obj, sets, s, args)
    if s["test"]:
        _test(model_obj, sets, s, args)


def _train(model, sets: dict, s: dict, args) -> None:
    from ..tuner import lora
    from ..tuner.finetune import TrainingInterrupted, print_report, train_lora

    if not sets["train"]:
        raise UserError(f"{Path(s['data']) / 'train.jsonl'} is missing or empty; it holds the training examples")
    if not sets["valid"]:
        info(f"note: no {Path(s['data']) / 'valid.jsonl'}; training without validation loss")
    params = lora.lora_parameters(**s["lora_parameters"])
    lora.detach_routers(model)
    lora.apply_lora(model, s["num_layers"], params)
    if s["resume_adapter_file"]:
        lora.load_adapter_weights(model, s["resume_adapter_file"])
        info(f"Loaded adapter weights from {s['resume_adapter_file']}")
    trainable, total = lora.trainable_count(model)
    info(f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")
    extra = {k: s[k] for k in ("model", "iters", "batch_size", "learning_rate", "seed", "noise_min", "noise_exponent",
                               "self_conditioning_rate", "pinned_rate", "encoder_loss_weight",
                               "mask_prompt")}
    config = lora.adapter_config(model, s["num_layers"], params, extra)
    out = Path(s["adapter_path"])

    def save(path: str) -> None:
        lora.save_adapters(model, out, config, Path(path).name)

    try:
        train_lora(model, sets["train"], sets["valid"], args, save, print_report)
    except TrainingInterrupted as e:
        info(f"\nInterrupted at iteration {e.iteration}: adapter saved to {e.path}; continue with "
             f"--resume-adapter-file {e.path}")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _test(model, sets: dict, s: dict, args) -> None:
    import math

    from ..tuner import lora
    from ..tuner.finetune import evaluate

    if not sets["test"]:
        raise UserError(f"{Path(s['data']) / 'test.jsonl'} is missing or empty; --test needs it")
    if not s["iters"]:
        lora.load_adapters(model, s["adapter_path"])
    loss = evaluate(model, sets["test"], args, s["test_batches"])
    print(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 700)):.3f}.", flush=True)
