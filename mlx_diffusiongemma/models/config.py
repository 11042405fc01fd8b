"""`ModelArgs`: DiffusionGemma's hyper-parameters built from `config.json`, validated.

Config fields the model needs have no defaults: a config that lacks one, or carries a value
this port cannot run, fails at load with the field's name. `explain_shape` names the fields
that set a tensor's shape, for the loader's error messages.
"""

from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

SUPPORTED_MODEL_TYPE = "diffusion_gemma"
LAYER_TYPES = ("sliding_attention", "full_attention")
REFERENCE_SOFTCAP = 30.0


def _require(cfg: dict, key: str, kind: type, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise UserError(f"config.json: field '{where}{key}' is missing; re-download the model's config.json")
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise UserError(
            f"config.json: field '{where}{key}' should be {kind.__name__}, found {value!r}; fix config.json"
        )
    return value


def _positive(cfg: dict, key: str, where: str = "text_config.") -> int:
    value = _require(cfg, key, int, where)
    if value <= 0:
        raise UserError(f"config.json: field '{where}{key}' must be positive, found {value}; fix config.json")
    return value


@dataclass
class ModelArgs:
    """Hyper-parameters of the DiffusionGemma text stack (plus the raw vision config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_types: list[str]
    head_dims: list[int]
    kv_heads: list[int]
    sliding_window: int
    num_experts: int
    top_k_experts: int
    rms_norm_eps: float
    rope_parameters: dict[str, dict]
    final_logit_softcapping: float
    max_position_embeddings: int
    canvas_length: int
    pad_token_id: int
    eos_token_ids: list[int]  # generation_config.json's, else config.json's
    vision_config: dict | None = None
    generation_config: dict = field(default_factory=dict)
    # Image placeholders (the release's ids are the reference's defaults) and the soft
    # tokens per image the checkpoint was configured for.
    image_token_id: int = 258880
    boi_token_id: int = 255999
    eoi_token_id: int = 258882
    vision_soft_tokens_per_image: int = 280

    @classmethod
    def from_config(cls, config: dict, generation_config: dict | None = None) -> "ModelArgs":
        """Validate a `config.json` dict (released or `save_pretrained` layout)."""
        if not isinstance(config, dict):
            raise UserError("config.json: expected a JSON object at the top level; re-download config.json")
        if generation_config is not None and not isinstance(generation_config, dict):
            raise UserError(
                "generation_config.json: expected a JSON object at the top level; re-download it or delete it"
            )
        model_type = config.get("model_type")
        if model_type != SUPPORTED_MODEL_TYPE:
            raise UserError(
                f"config.json: model_type is {model_type!r}, expected '{SUPPORTED_MODEL_TYPE}'; "
                "this tool only runs DiffusionGemma checkpoints"
            )
        text = _require(config, "text_config", dict, "")
        layer_types = _layer_types(text)
        head_dims, kv_heads = _per_layer_shapes(text, layer_types)
        _check_supported(text)
        return cls(
            vocab_size=_positive(text, "vocab_size"),
            hidden_size=_positive(text, "hidden_size"),
            intermediate_size=_positive(text, "intermediate_size"),
            moe_intermediate_size=_positive(text, "moe_intermediate_size"),
            num_hidden_layers=len(layer_types),
            num_attention_heads=_positive(text, "num_attention_heads"),
            layer_types=layer_types,
            head_dims=head_dims,
            kv_heads=kv_heads,
            sliding_window=_positive(text, "sliding_window"),
            num_experts=_positive(text, "num_experts"),
            top_k_experts=_top_k(text),
            rms_norm_eps=_require(text, "rms_norm_eps", float, "text_config."),
            rope_parameters=_rope_parameters(text, layer_types),
            final_logit_softcapping=_softcap(text),
            max_position_embeddings=_positive(text, "max_position_embeddings"),
            canvas_length=_positive(config, "canvas_length", ""),
            pad_token_id=_require(text, "pad_token_id", int, "text_config."),
            eos_token_ids=_eos_ids(config, text, generation_config or {}, _positive(text, "vocab_size")),
            vision_config=config.get("vision_config"),
            generation_config=dict(generation_config or {}),
            **_image_fields(config),
        )


def _image_fields(config: dict) -> dict:
    """The image token ids and soft-token count config.json sets (absent ones keep the
    reference's defaults)."""
    names = ("image_token_id", "boi_token_id", "eoi_token_id", "vision_soft_tokens_per_image")
    return {k: _positive(config, k, "") for k in names if config.get(k) is not None}


def _layer_types(text: dict) -> list[str]:
    layer_types = _require(text, "layer_types", list, "text_config.")
    n = _positive(text, "num_hidden_layers")
    if len(layer_types) != n or any(t not in LAYER_TYPES for t in layer_types):
        raise UserError(
            f"config.json: 'text_config.layer_types' must list {n} entries (num_hidden_layers) of "
            f"{LAYER_TYPES}, found {layer_types!r}; fix config.json"
        )
    return list(layer_types)


def _per_layer_shapes(text: dict, layer_types: list[str]) -> tuple[list[int], list[int]]:
    """Head dim and KV heads per layer: released configs name the full-attention values
    `global_head_dim` / `num_global_key_value_heads`; `save_pretrained` writes `per_layer_config`."""
    head_dim = _positive(text, "head_dim")
    kv = _positive(text, "num_key_value_heads")
    overrides = text.get("per_layer_config")
    if overrides is None:
        full = {"head_dim": _positive(text, "global_head_dim")}
        if text.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = _positive(text, "num_global_key_value_heads")
        overrides = {str(i): full for i, t in enumerate(layer_types) if t == "full_attention"}
    if not isinstance(overrides, dict):
        raise UserError("config.json: 'text_config.per_layer_config' must be an object; fix config.json")
    head_dims, kv_heads = [], []
    for i in range(len(layer_types)):
        layer = overrides.get(str(i), overrides.get(i, {})) or {}
        head_dims.append(int(layer.get("head_dim", head_dim)))
        kv_heads.append(int(layer.get("num_key_value_heads", kv)))
    heads = _positive(text, "num_attention_heads")
    for i, k in enumerate(kv_heads):
        if k <= 0 or heads % k:
            raise UserError(
                f"config.json: layer {i} has {k} key/value heads, which must divide "
                f"num_attention_heads={heads}; fix config.json"
            )
    return head_dims, kv_heads


def _top_k(text: dict) -> int:
    k = _positive(text, "top_k_experts")
    if k > _positive(text, "num_experts"):
        raise UserError(
            f"config.json: 'text_config.top_k_experts'={k} exceeds num_experts; fix config.json"
        )
    return k


def _rope_parameters(text: dict, layer_types: list[str]) -> dict[str, dict]:
    rope = _require(text, "rope_parameters", dict, "text_config.")
    for layer_type in set(layer_types):
        params = rope.get(layer_type)
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise UserError(
                f"config.json: 'text_config.rope_parameters.{layer_type}.rope_theta' is missing; fix config.json"
            )
        if params.get("rope_type", "default") not in ("default", "proportional"):
            raise UserError(
                f"config.json: rope_type {params.get('rope_type')!r} for {layer_type} is not supported "
                "(expected 'default' or 'proportional')"
            )
    return rope


def _softcap(text: dict) -> float:
    # transformers hard-codes 30.0 as a class constant, so `save_pretrained` omits it.
    if text.get("final_logit_softcapping") is None:
        return REFERENCE_SOFTCAP
    return _require(text, "final_logit_softcapping", float, "text_config.")


def _check_supported(text: dict) -> None:
    if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UserError(
            f"config.json: hidden_activation {text['hidden_activation']!r} is not supported "
            "(DiffusionGemma uses 'gelu_pytorch_tanh')"
        )
    if text.get("attention_bias"):
        raise UserError("config.json: attention_bias=true is not supported by DiffusionGemma checkpoints")
    if text.get("use_bidirectional_attention") == "all":
        raise UserError(
            "config.json: use_bidirectional_attention='all' is not supported "
            "(the DiffusionGemma encoder is causal: expected 'vision' or null)"
        )


def _eos_ids(config: dict, text: dict, generation: dict, vocab_size: int) -> list[int]:
    """The ids that end generation: generation_config.json's list when it has one (the
    release adds `<|tool_response>` there), else config.json's."""
    where, eos = "generation_config.json", generation.get("eos_token_id")
    if eos is None:
        where, eos = "config.json", config.get("eos_token_id", text.get("eos_token_id"))
    if eos is None:
        return []
    ids = [eos] if not isinstance(eos, list) else eos
    if any(type(e) is not int or e < 0 for e in ids):
        raise UserError(f"{where}: 'eos_token_id' must be a token id or a list of them, found {eos!r}; fix {where}")
    outside = [e for e in ids if e >= vocab_size]
    if outside:
        raise UserError(
            f"{where}: 'eos_token_id' {outside[0]} is outside the vocabulary (vocab_size {vocab_size}); fix {where}"
        )
    return ids


SHAPE_FIELDS = (
    ("vision", "vision_config (hidden_size, intermediate_size, head_dim, patch_size, ...)"),
    ("embed_tokens", "text_config.vocab_size x hidden_size"),
    ("experts.gate_up_proj", "text_config.num_experts x 2*moe_intermediate_size x hidden_size"),
    ("experts.down_proj", "text_config.num_experts x hidden_size x moe_intermediate_size"),
    ("router.proj", "text_config.num_experts x hidden_size"),
    ("per_expert_scale", "text_config.num_experts"),
    ("self_attn.q_norm", "text_config.head_dim (global_head_dim on full-attention layers)"),
    ("self_attn.k_norm", "text_config.head_dim (global_head_dim on full-attention layers)"),
    ("q_proj", "text_config.num_attention_heads x head_dim (global_head_dim on full layers) x hidden_size"),
    ("o_proj", "text_config.hidden_size x num_attention_heads*head_dim (global_head_dim on full layers)"),
    ("_proj", "text_config.num_key_value_heads x head_dim (num_global_key_value_heads x global_head_dim "
              "on full layers), or intermediate_size x hidden_size for MLPs"),
)


def explain_shape(name: str) -> str:
    """The config.json fields that set the shape of tensor `name` (for error messages)."""
    for key, fields in SHAPE_FIELDS:
        if key in name:
            return f"config.json {fields}"
    return "config.json text_config.hidden_size"
