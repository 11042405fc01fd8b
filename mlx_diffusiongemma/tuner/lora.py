"""LoRA and QLoRA for DiffusionGemma: adapter layers, adapter files and fusing.

The adapter layers are mlx-lm's (`LoRALinear`, `LoRASwitchLinear`): on a quantized linear
the base weights stay frozen and quantized and only the float low-rank factors train
(QLoRA). Adapters are written as mlx-lm writes them: `adapters.safetensors` (the trainable
parameters under the model's own names) beside `adapter_config.json` (`num_layers` and
`lora_parameters` with `rank`, `scale`, `dropout`, `keys`), plus what identifies the base
model, so an adapter trained for another model is refused with one line.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError, first_line
from ..models.diffusion_gemma import Router
from .trainer import DetachedRouter

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
# Attention and the dense MLP of each layer, as Unsloth's, NVIDIA's and TRL's recipes train.
DEFAULT_KEYS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")
ROUTER_KEYS = ("router.proj",)
DEFAULT_LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
# Hyper-parameters an adapter only fits when they match (its tensors' shapes follow them).
MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                "moe_intermediate_size", "num_experts", "num_attention_heads")


def lora_parameters(rank=None, scale=None, dropout=None, keys=None) -> dict:
    """mlx-lm's `lora_parameters` block with the defaults filled in and checked."""
    params = {**DEFAULT_LORA, **{k: v for k, v in dict(rank=rank, scale=scale, dropout=dropout,
                                                       keys=keys).items() if v is not None}}
    if not isinstance(params["rank"], int) or params["rank"] < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {params['rank']!r}")
    if not 0 <= params["dropout"] < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {params['dropout']!r}")
    params["keys"] = list(params["keys"])
    return params


def _check_keys(model, keys) -> None:
    # A key must name a linear in some layer: full-attention layers have no v_proj.
    for key in keys:
        if not any(_adaptable(_get(layer, key)) for layer in model.layers):
            raise UserError(
                f"LoRA key {key!r} is not a linear layer of this model; choose among "
                f"{', '.join(DEFAULT_KEYS + EXPERT_KEYS + ROUTER_KEYS)}"
            )


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        if not isinstance(module, nn.Module) or part not in module:
            return None
        module = module[part]
    return module


def _adaptable(module) -> bool:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return isinstance(module, (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear))


def _to_lora(module: nn.Module, params: dict) -> nn.Module:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    cls = LoRASwitchLinear if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)) else LoRALinear
    return cls.from_base(module, r=params["rank"], dropout=params["dropout"], scale=params["scale"])


def adapted_layers(model, num_layers: int) -> range:
    """Indices of the last `num_layers` layers (all of them for -1 or more than there are)."""
    n = len(model.layers)
    if num_layers == 0 or num_layers < -1:
        raise UserError(f"num_layers must be -1 (all) or a positive number of layers, got {num_layers}")
    return range(0 if num_layers == -1 else max(n - num_layers, 0), n)


def apply_lora(model, num_layers: int = 16, params: dict | None = None) -> None:
    """Freeze `model` and replace the `keys` linears of its last `num_layers` layers by
    LoRA layers (in place). Quantized linears keep their quantized weights (QLoRA).

    Adapted experts need the single `gather_mm` expert path, so this turns off
    per-expert grouping (which reads the base weights directly).
    """
    params = lora_parameters(**(params or {}))
    keys = params["keys"]
    _check_keys(model, keys)
    model.freeze()
    for i in adapted_layers(model, num_layers):
        layer = model.layers[i]
        swaps = [(key, _to_lora(_get(layer, key), params)) for key in keys if _adaptable(_get(layer, key))]
        layer.update_modules(tree_unflatten(swaps))
    if any(k in EXPERT_KEYS for k in keys):
        model.moe_grouped = False


def detach_routers(model) -> None:
    """Route with `DetachedRouter` (MLX cannot differentiate through the top-k indices),
    keeping each router's own modules (plain, quantized or adapted), parameters and
    frozen state."""
    for layer in model.layers:
        old = layer.router
        if type(old) is not Router:
            continue
        router = DetachedRouter(model.args)
        router.update_modules({"proj": old.proj})
        router.update({"scale": old.scale, "per_expert_scale": old.per_expert_scale})
        frozen = [k for k in ("scale", "per_expert_scale") if k not in old.trainable_parameters()]
        if frozen:
            router.freeze(keys=frozen, recurse=False)
        layer.router = router


def trainable_count(model) -> tuple[int, int]:
    """(trainable, total) numbers of scalars; quantized weights count their packed values."""
    def count(tree):
        return sum(v.size for _, v in tree_flatten(tree))

    return count(model.trainable_parameters()), count(model.parameters())


def adapter_weights(model) -> dict[str, mx.array]:
    """The trainable parameters (the LoRA factors) by name."""
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(model, num_layers: int, params: dict, extra: dict | None = None) -> dict:
    """What `adapter_config.json` holds: mlx-lm's fields, the base model's dimensions and
    `extra` (the training settings, for the record)."""
    base = {field: getattr(model.args, field) for field in MODEL_FIELDS}
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params,
            "base_model": base, **(extra or {})}


def save_adapters(model, adapter_path, config: dict, file_name: str = ADAPTER_FILE) -> Path:
    """Write the adapter tensors (to `file_name` inside `adapter_path`) and its config."""
    out = Path(adapter_path)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / file_name), adapter_weights(model), metadata={"format": "mlx"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out / file_name


def read_adapter_config(adapter_path) -> dict:
    """`adapter_config.json` of an adapter directory, checked; one-line errors."""
    path = Path(adapter_path) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; an adapter directory holds {CONFIG_FILE} and {ADAPTER_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({first_line(e)}); re-save the adapter") from None
    if not isinstance(config, dict) or not isinstance(config.get("lora_parameters"), dict):
        raise UserError(f"{path} has no \"lora_parameters\" object; is this an adapter directory?")
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{path}: fine_tune_type {config['fine_tune_type']!r} is not supported (only lora)")
    return config


def check_base_model(model, config: dict, where) -> None:
    """Refuse an adapter whose recorded base model has other dimensions than `model`."""
    base = config.get("base_model") or {}
    for field in MODEL_FIELDS:
        if field in base and base[field] != getattr(model.args, field):
            raise UserError(
                f"{where} was trained for another model ({field} {base[field]}, this model has "
                f"{getattr(model.args, field)}); use the base model it was trained on"
            )


def load_adapter_weights(model, file) -> None:
    """Load LoRA factors from `file` into an adapted `model`: every tensor must be one of
    its trainable parameters with the same shape (one-line errors otherwise)."""
    file = Path(file)
    if not file.is_file():
        raise UserError(f"{file} is missing; train an adapter first or check --adapter-path")
    try:
        weights = mx.load(str(file))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot read {file} ({first_line(e)}); re-save the adapter") from None
    expected = adapter_weights(model)
    for name, value in weights.items():
        if name not in expected:
            raise UserError(f"{file}: tensor {name} is not a LoRA parameter of this model with this "
                            "adapter_config.json (another model's adapter, or other keys/num_layers?)")
        if value.shape != expected[name].shape:
            raise UserError(f"{file}: {name} has shape {tuple(value.shape)}, this model with this "
                            f"adapter_config.json expects {tuple(expected[name].shape)} (another rank or model?)")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"{file} lacks {len(missing)} LoRA tensors of this configuration (first: {missing[0]})")
    model.load_weights(list(weights.items()), strict=False)


def load_adapters(model, adapter_path) -> dict:
    """Apply the adapter in directory `adapter_path` to `model` (in place); returns its
    config. The model is left frozen and in eval mode."""
    config = read_adapter_config(adapter_path)
    where = Path(adapter_path) / CONFIG_FILE
    check_base_model(model, config, where)
    try:
        params = lora_parameters(**{k: config["lora_parameters"].get(k) for k in ("rank", "scale", "dropout", "keys")})
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    apply_lora(model, config.get("num_layers", 16), params)
    load_adapter_weights(model, Path(adapter_path) / ADAPTER_FILE)
    model.eval()
    return config


def fuse(model, dequantize: bool = False) -> None:
    """Fold every LoRA layer of `model` into its base layer (in place). A quantized base is
    re-quantized with its own bits and group size unless `dequantize`, which also turns
    every other quantized layer into a plain one."""
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules()
             if isinstance(m, (LoRALinear, LoRASwitchLinear))]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    # Fused experts are ordinary switch layers again: the grouped CPU path applies.
    model.moe_grouped = mx.default_device().type == mx.DeviceType.cpu


def save_model(model, source, out, overwrite: bool = False) -> Path:
    """Write `model` (fused) as an ordinary model directory every command loads: its
    parameters in `model.safetensors`, the source's config.json (without its quantization
    block when nothing is quantized any more) and every other non-weight file of `source`
    (tokenizer, chat template, generation config)."""
    from ..loading import MODEL_PATTERNS, read_json
    from ..weights.atomic import atomic_output_dir
    from ..weights.hub import resolve_model_path

    source = resolve_model_path(source, MODEL_PATTERNS)
    config = read_json(source / "config.json")
    weights = dict(tree_flatten(model.parameters()))
    if "vision_tower" not in model.model.encoder:
        config.pop("vision_config", None)  # as convert writes a text-only model
    if not any(name.endswith(".scales") for name in weights):
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        dtypes = {v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
        if len(dtypes) == 1:
            config["dtype"] = str(dtypes.pop()).split(".")[-1]
    needed = sum(v.nbytes for v in weights.values()) + 2**20
    with atomic_output_dir(out, overwrite, needed_bytes=needed) as tmp:
        for f in sorted(source.iterdir()):
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                    "config.json", "model.safetensors.index.json"):
                shutil.copyfile(f, tmp / f.name)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(out).expanduser().resolve()
