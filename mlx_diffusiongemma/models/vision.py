"""The Gemma 4 vision tower's weights, named after the checkpoint's tensors.

Image input is not supported yet: these modules hold the tower so a converted model keeps
it (unquantized) and a later release can add the forward pass without re-converting.
Text generation never touches them, and `text_only` loading leaves them out entirely.
"""

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError


def _field(cfg: dict, key: str):
    if key not in cfg:
        raise UserError(f"config.json: field 'vision_config.{key}' is missing; fix config.json or load text-only")
    return cfg[key]


class ClippableLinear(nn.Module):
    def __init__(self, dims_in: int, dims_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                setattr(self, name, mx.zeros(()))


class VisionAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        H, D, clipped = _field(cfg, "hidden_size"), _field(cfg, "head_dim"), cfg.get("use_clipped_linears", False)
        heads, kv = _field(cfg, "num_attention_heads"), _field(cfg, "num_key_value_heads")
        self.q_proj = ClippableLinear(H, heads * D, clipped)
        self.k_proj = ClippableLinear(H, kv * D, clipped)
        self.v_proj = ClippableLinear(H, kv * D, clipped)
        self.o_proj = ClippableLinear(heads * D, H, clipped)
        self.q_norm = nn.RMSNorm(D)
        self.k_norm = nn.RMSNorm(D)


class VisionMLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        H, I, clipped = _field(cfg, "hidden_size"), _field(cfg, "intermediate_size"), cfg.get("use_clipped_linears", False)
        self.gate_proj = ClippableLinear(H, I, clipped)
        self.up_proj = ClippableLinear(H, I, clipped)
        self.down_proj = ClippableLinear(I, H, clipped)


class VisionLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        H = _field(cfg, "hidden_size")
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, nn.RMSNorm(H))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = [VisionLayer(cfg) for _ in range(_field(cfg, "num_hidden_layers"))]


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        H, P = _field(cfg, "hidden_size"), _field(cfg, "patch_size")
        self.input_proj = nn.Linear(3 * P * P, H, bias=False)
        self.position_embedding_table = mx.zeros((2, _field(cfg, "position_embedding_size"), H))


class VisionTower(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        if cfg.get("standardize", False):
            self.std_bias = mx.zeros((cfg["hidden_size"],))
            self.std_scale = mx.ones((cfg["hidden_size"],))


class VisionEmbedder(nn.Module):
    """Projects vision features into the text model's width."""

    def __init__(self, cfg: dict, text_hidden: int):
        super().__init__()
        self.embedding_projection = nn.Linear(_field(cfg, "hidden_size"), text_hidden, bias=False)
