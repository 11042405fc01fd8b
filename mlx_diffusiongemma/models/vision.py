"""The Gemma 4 vision tower and its embedder, named after the checkpoint's tensors.

An image arrives as patches (`images.prepare_image`): `pixels` (N, 3 * patch**2) in [0, 1]
and their `positions` (N, 2) as (x, y) on the patch grid, N a multiple of pool**2. The tower
runs bidirectional attention over the patches with a 2-D (axial) RoPE, averages each
pool x pool block of patches into one soft token, and `VisionEmbedder` projects the soft
tokens into the text model's width. Numerics follow transformers 5.23
`models/gemma4/modeling_gemma4.py` (`Gemma4VisionModel`) and DiffusionGemma's
`DiffusionGemmaMultimodalEmbedder`.

Padding patches, which the reference appends up to the patch budget and masks out of every
attention and of the pooling, are never built here: the result is the same and an image
smaller than the budget costs only its own patches.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from .layers import RMSNorm, rms_norm


def _field(cfg: dict, key: str):
    if key not in cfg:
        raise UserError(f"config.json: field 'vision_config.{key}' is missing; fix config.json or load text-only")
    return cfg[key]


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output may be clamped to stored ranges."""

    def __init__(self, dims_in: int, dims_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        self.clipped = clipped
        if clipped:
            # Unbounded until the checkpoint's ranges are loaded, as in the reference.
            self.input_min, self.output_min = mx.array(-math.inf), mx.array(-math.inf)
            self.input_max, self.output_max = mx.array(math.inf), mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))


def axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the first half of each head by the patch's x position and the second half by
    its y position, each half split-half (non-interleaved). x: (B, N, heads, D);
    cos/sin: (B, N, 1, D) laid out [x, x, y, y] quarters."""
    D = x.shape[-1]
    q = D // 4
    parts = []
    for half in (0, 1):
        xs = x[..., half * 2 * q : (half + 1) * 2 * q]
        c, s = cos[..., half * 2 * q : (half + 1) * 2 * q], sin[..., half * 2 * q : (half + 1) * 2 * q]
        rotated = mx.concatenate([-xs[..., q:], xs[..., :q]], axis=-1)
        parts.append(xs * c + rotated * s)
    return mx.concatenate(parts, axis=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        H, D, clipped = _field(cfg, "hidden_size"), _field(cfg, "head_dim"), cfg.get("use_clipped_linears", False)
        self.n_heads, self.n_kv, self.head_dim = _field(cfg, "num_attention_heads"), _field(cfg, "num_key_value_heads"), D
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.q_proj = ClippableLinear(H, self.n_heads * D, clipped)
        self.k_proj = ClippableLinear(H, self.n_kv * D, clipped)
        self.v_proj = ClippableLinear(H, self.n_kv * D, clipped)
        self.o_proj = ClippableLinear(self.n_heads * D, H, clipped)
        self.q_norm = RMSNorm(D, self.eps)
        self.k_norm = RMSNorm(D, self.eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, query_chunk: int | None) -> mx.array:
        B, N, _ = x.shape
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(B, N, self.n_heads, -1)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(B, N, self.n_kv, -1)), cos, sin)
        # v_norm has no weight.
        v = rms_norm(self.v_proj(x).reshape(B, N, self.n_kv, -1), None, self.eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        # Every patch sees every patch. Queries go in chunks, each evaluated before the next
        # is built, so the (heads, N, N) scores of a large image are never all held at once
        # (left lazy, MLX would schedule every chunk's scores together).
        step = query_chunk or N
        outs = []
        for i in range(0, N, step):
            outs.append(mx.fast.scaled_dot_product_attention(q[:, :, i : i + step], k, v, scale=1.0))
            if step < N:
                mx.eval(outs[-1])
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        H, I, clipped = _field(cfg, "hidden_size"), _field(cfg, "intermediate_size"), cfg.get("use_clipped_linears", False)
        self.gate_proj = ClippableLinear(H, I, clipped)
        self.up_proj = ClippableLinear(H, I, clipped)
        self.down_proj = ClippableLinear(I, H, clipped)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        H, eps = _field(cfg, "hidden_size"), cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(H, eps))

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, query_chunk: int | None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, query_chunk))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


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

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        # Gemma 4 takes pixels in [0, 1] and maps them to [-1, 1] here.
        dtype = self.input_proj.weight.dtype
        h = self.input_proj((2 * (pixels - 0.5)).astype(dtype))
        table = self.position_embedding_table
        return h + table[0][positions[..., 0]] + table[1][positions[..., 1]]


class VisionTower(nn.Module):
    """Patches of one image -> its soft tokens (before the embedder)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        self.hidden_size = _field(cfg, "hidden_size")
        self.head_dim = _field(cfg, "head_dim")
        self.pool = cfg.get("pooling_kernel_size", 3)
        self.rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 100.0)
        # Query rows per attention call; None attends all at once (see VisionAttention).
        self.query_chunk: int | None = 1024
        if cfg.get("standardize", False):
            self.std_bias = mx.zeros((cfg["hidden_size"],))
            self.std_scale = mx.ones((cfg["hidden_size"],))

    def rope(self, positions: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """cos and sin (B, N, 1, head_dim) for patch positions (B, N, 2)."""
        quarter = self.head_dim // 4
        inv_freq = 1.0 / (self.rope_theta ** (mx.arange(0, 2 * quarter, 2, dtype=mx.float32) / (2 * quarter)))
        angles = positions.astype(mx.float32)[..., None] * inv_freq  # (B, N, 2, quarter)
        ax, ay = angles[..., 0, :], angles[..., 1, :]
        layout = mx.concatenate([ax, ax, ay, ay], axis=-1)[:, :, None]
        return mx.cos(layout).astype(dtype), mx.sin(layout).astype(dtype)

    def __call__(self, pixels: mx.array, positions: mx.array, grid: tuple[int, int]) -> mx.array:
        """Soft tokens (B, rows/pool * cols/pool, hidden) in row-major block order for
        `pixels` (B, N, 3 * patch**2) whose patches lie row-major on a `grid` of
        (rows, cols) patches."""
        x = self.patch_embedder(pixels, positions)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, self.query_chunk)
        return self.pool_and_scale(x, grid)

    def pool_and_scale(self, x: mx.array, grid: tuple[int, int]) -> mx.array:
        B, _, H = x.shape
        rows, cols = grid
        k = self.pool
        # The mean of each k x k block of patches, in float32 like the reference's pooler.
        blocks = x.astype(mx.float32).reshape(B, rows // k, k, cols // k, k, H)
        pooled = blocks.sum(axis=(2, 4)).reshape(B, -1, H) / (k * k)
        pooled = pooled * math.sqrt(self.hidden_size)
        if "std_bias" in self:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(x.dtype)


class VisionEmbedder(nn.Module):
    """Projects vision features into the text model's width."""

    def __init__(self, cfg: dict, text_hidden: int):
        super().__init__()
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.embedding_projection = nn.Linear(cfg.get("output_proj_dims") or _field(cfg, "hidden_size"),
                                              text_hidden, bias=False)

    def __call__(self, soft_tokens: mx.array) -> mx.array:
        # embedding_pre_projection_norm has no weight.
        return self.embedding_projection(rms_norm(soft_tokens, None, self.eps))
