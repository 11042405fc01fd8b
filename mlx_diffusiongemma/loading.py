"""Loading models and tokenizers from disk (or the Hugging Face Hub)."""

import json
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import UserError, first_line
from .models import Model, ModelArgs
from .models.config import explain_shape
from .models.sharding import silence_followers, world_group
from .weights.checks import check_tensors
from .weights.hub import resolve_model_path
from .weights.memory import estimate_memory_warning
from .weights.safetensors import checkpoint_bytes, list_checkpoint
from .weights.slices import load_sharded

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# JSON files transformers reads with the tokenizer: a corrupt one fails deep inside it with
# a long traceback, so each is parsed here first and named.
TOKENIZER_JSON_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "chat_template.json")
# transformers' own "no limit" value: our context check is the one that counts.
UNLIMITED_LENGTH = int(1e30)


class MemoryWarning(UserWarning):
    """The model's weights may not fit in this machine's memory."""


def read_json(path: Path, required: bool = True) -> dict | None:
    """Parse a JSON file, turning every failure into a one-line UserError."""
    if not path.is_file():
        if required:
            raise UserError(f"{path} is missing; the model directory needs it (re-download or re-convert)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); re-download it") from None


def load_config(model_dir: Path) -> tuple[dict, ModelArgs]:
    """`config.json` as read and the validated hyper-parameters and generation defaults
    (with `generation_config.json`) of a model directory."""
    config = read_json(model_dir / "config.json")
    generation = read_json(model_dir / "generation_config.json", required=False)
    return config, ModelArgs.from_config(config, generation)


def apply_quantization(model: Model, quantization: dict, stored: set[str]) -> None:
    """Turn the layers a converted checkpoint stores quantized into quantized layers.

    Per-layer entries of the `quantization` block (mlx-lm / mlx-vlm layout) win; other
    layers are quantized with the block's defaults exactly when the checkpoint has scales.
    """
    default = _quantization_defaults(quantization)

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        if path in quantization:
            return quantization[path]
        return default if f"{path}.scales" in stored else False

    try:
        nn.quantize(model, class_predicate=predicate, **default)
    except (ValueError, TypeError) as e:
        raise UserError(
            f"config.json: the \"quantization\" block does not fit this model ({e}); "
            "use the config.json that came with these weights"
        ) from None


def _quantization_defaults(quantization: dict) -> dict:
    if not isinstance(quantization, dict):
        raise UserError("config.json: \"quantization\" must be an object; use the config.json that came with the weights")
    default = {"group_size": quantization.get("group_size"), "bits": quantization.get("bits"),
               "mode": quantization.get("mode", "affine")}
    for key in ("group_size", "bits"):
        if type(default[key]) is not int or default[key] <= 0:
            raise UserError(
                f"config.json: quantization.{key} is {default[key]!r}, expected a positive integer; "
                "use the config.json that came with these weights"
            )
    return default


def _refuse_foreign_quantization(config: dict) -> None:
    hf_quant = config.get("quantization_config")
    method = hf_quant.get("quant_method") if isinstance(hf_quant, dict) else None
    if method and not config.get("quantization"):
        raise UserError(
            f"config.json: checkpoints quantized with quant_method {method!r} are not supported; "
            "use the bf16 release (google/diffusiongemma-26B-A4B-it) or an MLX conversion"
        )


def expected_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """Every parameter of `model` with its shape (what a checkpoint must provide)."""
    return {name: tuple(a.shape) for name, a in tree_flatten(model.parameters())}


def load_model(path, text_only: bool = False, lazy: bool = False) -> Model:
    """Load a DiffusionGemma model from a directory or Hub id.

    Accepts the released Hugging Face layout (bf16/f16/f32 safetensors), directories written
    by `mlx_diffusiongemma.convert`, and mlx-vlm conversions. Every header is checked
    (names, shapes, dtypes) before any weight is read. `text_only` leaves the vision tower
    out: its tensors are never read. With `lazy`, weights are read when first used. Emits
    a `MemoryWarning` when the weights need more than ~90% of this machine's memory.
    """
    model_dir = resolve_model_path(path, MODEL_PATTERNS)
    config, args = load_config(model_dir)
    _refuse_foreign_quantization(config)
    model = Model(args, text_only=text_only)
    infos = model.sanitize(list_checkpoint(model_dir))
    quantization = config.get("quantization")
    if quantization:
        apply_quantization(model, quantization, set(infos))
    check_tensors(infos, expected_shapes(model), quantized=bool(quantization), explain=explain_shape)
    group = world_group()
    if group is not None:
        # Under `mlx.launch` with 2+ ranks: this rank reads and holds only its part.
        silence_followers(group)
        return load_sharded(model, infos, group, lazy)
    warning = estimate_memory_warning(checkpoint_bytes(infos))
    if warning:
        warnings.warn(warning, MemoryWarning, stacklevel=2)
    model.load_weights(list(_read_weights(model, infos).items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    return model


def _read_weights(model: Model, infos: dict) -> dict[str, mx.array]:
    """Lazy arrays of the needed tensors; shards holding none of them are never opened."""
    weights = {}
    for file in sorted({info.file for info in infos.values()}):
        try:
            arrays = mx.load(str(file))
        except RuntimeError as e:
            raise UserError(f"cannot read {file} ({e}); re-download it") from None
        weights.update((k, v) for k, v in model.sanitize(arrays).items() if k in infos)
    return weights


def load(path, text_only: bool = True, lazy: bool = False, adapter_path=None):
    """Load `(model, tokenizer)`; the tokenizer is mlx-lm's `TokenizerWrapper` with the
    model's generation EOS ids. `adapter_path` applies a LoRA adapter directory (as
    written by `mlx-diffusiongemma lora`) on top of the weights."""
    model_dir = resolve_model_path(path, MODEL_PATTERNS)
    missing = [f for f in TOKENIZER_FILES if not (model_dir / f).is_file()]
    if missing:
        raise UserError(f"{model_dir} has no {missing[0]}; copy the tokenizer files into the model directory")
    check_tokenizer_files(model_dir)  # before the (slow) weights: a bad file fails at once
    model = load_model(model_dir, text_only=text_only, lazy=lazy)
    if adapter_path is not None:
        from .tuner.lora import load_adapters

        load_adapters(model, adapter_path)
    tokenizer = load_tokenizer(model_dir, list(model.args.eos_token_ids))
    check_vocab(tokenizer, model)
    return model, tokenizer


def check_tokenizer_files(model_dir: Path) -> None:
    """Parse the tokenizer's JSON files that `model_dir` holds (each once: the real
    tokenizer.json is tens of MB); a corrupt one is a UserError naming it."""
    for name in TOKENIZER_JSON_FILES:
        path = model_dir / name
        data = read_json(path, required=False)
        if data is not None and not isinstance(data, dict):
            raise UserError(
                f"{path} holds a JSON {type(data).__name__}, expected an object; re-download it from the model's repository"
            )
        if name == "tokenizer.json" and data is not None and not isinstance(data.get("model"), dict):
            raise UserError(
                f"{path} has no \"model\" object, so it is not a tokenizers file; "
                "re-download it from the model's repository"
            )


def load_tokenizer(model_dir: Path, eos_token_ids: list[int]):
    """mlx-lm's `TokenizerWrapper` for `model_dir`; any failure of its files is one UserError.
    Callers run `check_tokenizer_files` first (`load` and `convert` do, before the weights)."""
    from mlx_lm.tokenizer_utils import load as mlx_lm_load

    try:
        tokenizer = mlx_lm_load(model_dir, eos_token_ids=eos_token_ids)
    except Exception as e:  # transformers and tokenizers raise many types for a bad file
        raise UserError(
            f"cannot load the tokenizer in {model_dir} ({type(e).__name__}: {first_line(e)}); "
            "re-download tokenizer.json and tokenizer_config.json from the model's repository"
        ) from None
    # Otherwise transformers warns about prompts over tokenizer_config.json's
    # model_max_length ahead of our own line about the model's context.
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    if getattr(hf, "model_max_length", None) is not None:
        hf.model_max_length = UNLIMITED_LENGTH
    return tokenizer


def check_vocab(tokenizer, model: Model) -> None:
    size = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else tokenizer.vocab_size
    if size > model.args.vocab_size:
        raise UserError(
            f"the tokenizer has {size} tokens but the model's vocab_size is {model.args.vocab_size}; "
            "use the tokenizer files that came with this model"
        )
