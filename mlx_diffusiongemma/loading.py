"""Loading models and tokenizers from disk (or the Hugging Face Hub)."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import check_tensors, list_checkpoint, resolve_model_path
from .errors import UserError
from .model import Model, ModelArgs

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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


def load_config(model_dir: Path) -> ModelArgs:
    """Model hyper-parameters and generation defaults of a model directory."""
    config = read_json(model_dir / "config.json")
    generation = read_json(model_dir / "generation_config.json", required=False)
    return ModelArgs.from_config(config, generation)


def apply_quantization(model: Model, quantization: dict, stored: set[str]) -> None:
    """Turn the layers a converted checkpoint stores quantized into quantized layers.

    Per-layer entries of the `quantization` block (mlx-lm / mlx-vlm layout) win; other
    layers are quantized with the block's defaults exactly when the checkpoint has scales.
    """
    default = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        if path in quantization:
            return quantization[path]
        return default if f"{path}.scales" in stored else False

    nn.quantize(model, class_predicate=predicate, **{k: v for k, v in default.items() if k != "mode"})


def expected_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(a.shape) for name, a in tree_flatten(model.parameters())}


def load_model(path, text_only: bool = False, lazy: bool = False) -> Model:
    """Load a DiffusionGemma model from a directory or Hub id.

    Accepts the released Hugging Face layout (bf16/f16/f32 safetensors), directories written
    by `mlx_diffusiongemma.convert`, and mlx-vlm conversions. `text_only` leaves the vision
    tower out of memory. With `lazy`, weights are read when first used.
    """
    model_dir = resolve_model_path(path, MODEL_PATTERNS)
    config = read_json(model_dir / "config.json")
    args = ModelArgs.from_config(config, read_json(model_dir / "generation_config.json", required=False))
    model = Model(args, text_only=text_only)
    infos = model.sanitize(list_checkpoint(model_dir))
    quantization = config.get("quantization")
    if quantization:
        apply_quantization(model, quantization, set(infos))
    check_tensors(infos, expected_shapes(model), quantized=bool(quantization), explain=model.explain_shape)
    weights = {}
    for file in sorted({info.file for info in infos.values()}):
        weights.update(model.sanitize(mx.load(str(file))))
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    return model


def load(path, text_only: bool = True, lazy: bool = False):
    """Load `(model, tokenizer)`; the tokenizer is mlx-lm's `TokenizerWrapper` with the
    model's generation EOS ids."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    model_dir = resolve_model_path(path, MODEL_PATTERNS)
    missing = [f for f in TOKENIZER_FILES if not (model_dir / f).is_file()]
    if missing:
        raise UserError(f"{model_dir} has no {missing[0]}; copy the tokenizer files into the model directory")
    model = load_model(model_dir, text_only=text_only, lazy=lazy)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=model_eos_ids(model))
    check_vocab(tokenizer, model)
    return model, tokenizer


def model_eos_ids(model: Model) -> list[int]:
    eos = model.args.generation_config.get("eos_token_id") or model.args.eos_token_ids
    return [eos] if isinstance(eos, int) else list(eos)


def check_vocab(tokenizer, model: Model) -> None:
    size = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else tokenizer.vocab_size
    if size > model.args.vocab_size:
        raise UserError(
            f"the tokenizer has {size} tokens but the model's vocab_size is {model.args.vocab_size}; "
            "use the tokenizer files that came with this model"
        )
