"""DiffusionGemma in MLX: one Gemma 4 MoE stack used as a causal encoder and a
bidirectional canvas decoder, plus the self-conditioning block.

Reading order: the config built from `config.json`, modules named after the checkpoint's
tensors, then `Model` with `encode`, `denoise`, `make_cache`, `sanitize` and
`quant_predicate`. Numerics follow transformers 5.23 `models/diffusion_gemma`.
"""

import math
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UserError
from .cache import FullCache, SlidingCache
from .config import ModelArgs
from .layers import RMSNorm, rms_norm
from .sharding import all_sum, sum_pair
from .vision import VisionEmbedder, VisionTower


@partial(mx.compile, shapeless=True)
def gelu_tanh_glu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


@mx.compile
def softcap(logits: mx.array, cap: mx.array) -> mx.array:
    # The reference softcaps in float32 whatever the model dtype.
    logits = logits.astype(mx.float32)
    return mx.tanh(logits / cap) * cap


class Attention(nn.Module):
    group = None  # set by `Model.shard`: this rank holds some heads, o_proj sums them

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        H, D = args.hidden_size, args.head_dims[layer]
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.kv_heads[layer], D
        self.is_sliding = args.layer_types[layer] == "sliding_attention"
        self.window = args.sliding_window if self.is_sliding else None
        self.eps = args.rms_norm_eps
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=False)
        if self.is_sliding:
            # Full-attention layers have no v_proj: their values are the raw keys.
            self.v_proj = nn.Linear(H, self.n_kv * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=False)
        self.q_norm = RMSNorm(D, self.eps)
        self.k_norm = RMSNorm(D, self.eps)
        # mlx-lm is imported on first use: it pulls in transformers, which would make
        # `import mlx_diffusiongemma` (and the CLI's --help) take seconds.
        from mlx_lm.models.rope_utils import initialize_rope

        rope = args.rope_parameters[args.layer_types[layer]]
        self.rope = initialize_rope(D, rope["rope_theta"], False, rope)

    def project(self, x: mx.array, offset: int) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values (B, heads, L, D) for tokens starting at `offset`."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv, self.head_dim) if self.is_sliding else k
        # q/k norms come before RoPE; v_norm has no weight and sees the raw projection.
        q = self.rope(self.q_norm(q).transpose(0, 2, 1, 3), offset=offset)
        k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset=offset)
        v = rms_norm(v, None, self.eps).transpose(0, 2, 1, 3)
        return q, k, v

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array, q: mx.array, mask) -> mx.array:
        B, L, _ = x.shape
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        return all_sum(self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), self.group)


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_tanh_glu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self.k = args.top_k_experts
        self.eps = args.rms_norm_eps

    def __call__(self, h: mx.array) -> tuple[mx.array, mx.array]:
        """Top-k expert indices and their weights for the raw residual stream `h`."""
        z = rms_norm(h, None, self.eps) * self.scale * (h.shape[-1] ** -0.5)
        probs = mx.softmax(self.proj(z).astype(mx.float32), axis=-1)
        idx = self.top_k(probs)
        top = mx.take_along_axis(probs, idx, axis=-1)
        weights = top / top.sum(axis=-1, keepdims=True) * self.per_expert_scale[idx]
        return idx, weights

    def top_k(self, probs: mx.array) -> mx.array:
        """Indices of the `k` most probable experts per token (unordered)."""
        return mx.argpartition(-probs, kth=self.k - 1, axis=-1)[..., : self.k]


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        from mlx_lm.models.switch_layers import SwitchLinear  # deferred: see Attention

        H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
        # Fused like the checkpoint: rows [0, I) are the gate, [I, 2I) the up projection.
        self.gate_up_proj = SwitchLinear(H, 2 * I, E, bias=False)
        self.down_proj = SwitchLinear(I, H, E, bias=False)

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array, grouped: bool = False) -> mx.array:
        """Weighted sum of each token's top-k experts. `grouped` runs one GEMM per expert
        hit (needs the routing on the host); otherwise a single sorted `gather_mm`."""
        *lead, H = x.shape
        k = idx.shape[-1]
        flat_idx = idx.reshape(-1)
        # Sorting token copies by expert makes each expert's rows contiguous.
        order = mx.argsort(flat_idx)
        xs = x.reshape(-1, H)[order // k]
        sorted_idx = flat_idx[order]
        y = self._grouped(xs, sorted_idx) if grouped else self._gathered(xs, sorted_idx)
        y = y[mx.argsort(order)].reshape(*lead, k, H)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def _gathered(self, xs: mx.array, sorted_idx: mx.array) -> mx.array:
        h = self.gate_up_proj(xs[:, None], sorted_idx, sorted_indices=True)
        gate, up = mx.split(h, 2, axis=-1)
        return self.down_proj(gelu_tanh_glu(gate, up), sorted_idx, sorted_indices=True)[:, 0]

    def _grouped(self, xs: mx.array, sorted_idx: mx.array) -> mx.array:
        # On CPU, gather_mm runs row by row; per-expert slices reach the BLAS GEMM.
        E = self.gate_up_proj.num_experts
        edges = mx.searchsorted(sorted_idx, mx.arange(E + 1, dtype=sorted_idx.dtype)).tolist()
        outs = []
        for e, (start, end) in enumerate(zip(edges[:-1], edges[1:])):
            if end > start:
                gate, up = mx.split(expert_linear(self.gate_up_proj, e, xs[start:end]), 2, axis=-1)
                outs.append(expert_linear(self.down_proj, e, gelu_tanh_glu(gate, up)))
        return mx.concatenate(outs, axis=0)


def expert_linear(layer: nn.Module, e: int, x: mx.array) -> mx.array:
    """x @ W[e].T for one expert of a plain or quantized SwitchLinear."""
    if "scales" in layer:
        return mx.quantized_matmul(
            x, layer["weight"][e], layer["scales"][e], layer["biases"][e] if "biases" in layer else None,
            transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
        )
    return x @ layer["weight"][e].T


class DecoderLayer(nn.Module):
    """One Gemma 4 MoE layer; the encoder runs it with its own `layer_scalar`."""

    group = None  # set by `Model.shard`: the MLP and experts then return partial sums

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(H, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        for name in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(H, eps))
        self.layer_scalar = mx.ones((1,))

    def attend(self, x: mx.array, cache, decoding: bool, images: mx.array | None = None) -> mx.array:
        """Residual attention block. Encoding appends to `cache` under a causal (and, for
        sliding layers, windowed) mask, opened between the tokens of one image (`images`,
        see `image_mask`); decoding reads it and attends everywhere."""
        L = x.shape[1]
        h = self.input_layernorm(x)
        offset = cache.offset
        q, k, v = self.self_attn.project(h, offset)
        mask = None
        if decoding:
            past_k, past_v = cache.fetch()
            if past_k is not None:
                k, v = mx.concatenate([past_k, k], axis=2), mx.concatenate([past_v, v], axis=2)
        else:
            k, v = cache.update_and_fetch(k, v)
            T = k.shape[2]
            mask = causal_mask(offset, L, offset + L - T, T, self.self_attn.window)
            if images is not None:
                mask = mask | image_mask(images, T)
        return x + self.post_attention_layernorm(self.self_attn(h, k, v, q, mask))

    def feed_forward(self, h: mx.array, scalar: mx.array, grouped: bool = False) -> mx.array:
        dense = self.mlp(self.pre_feedforward_layernorm(h))
        # The router reads the raw residual, the experts its pre_feedforward_layernorm_2.
        idx, weights = self.router(h)
        moe = self.experts(self.pre_feedforward_layernorm_2(h), idx, weights, grouped)
        # Sharded, both branches are partial sums that must be whole before their norms.
        dense, moe = sum_pair(dense, moe, self.group)
        dense, moe = self.post_feedforward_layernorm_1(dense), self.post_feedforward_layernorm_2(moe)
        return (h + self.post_feedforward_layernorm(dense + moe)) * scalar


class SelfConditioning(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        H = args.hidden_size
        self.pre_norm = RMSNorm(H, args.rms_norm_eps)
        self.gate_proj = nn.Linear(H, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, H, bias=False)
        self.eps = args.rms_norm_eps

    def __call__(self, embeds: mx.array, signal: mx.array | None) -> mx.array:
        if signal is not None:
            h = self.pre_norm(signal)
            embeds = embeds + self.down_proj(gelu_tanh_glu(self.gate_proj(h), self.up_proj(h)))
        # With no signal the MLP contributes exactly zero, so only the weightless norm remains.
        return rms_norm(embeds, None, self.eps)


def top_k(x: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest values of the last axis and their indices (in no particular order)."""
    idx = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(x, idx, axis=-1), idx


def top_k_soft_embed(decoder, logits: mx.array, probs: mx.array | None, k: int, dtype: mx.Dtype) -> mx.array:
    """The self-conditioning signal from the k most probable tokens of each position, their
    probabilities renormalised: k embedding rows instead of a product with the whole table.
    Sharded, each rank offers its slice's k best, the k best of all are kept, and each rank
    adds the rows it holds to an all-sum of the signal (one (B, L, H) array, as the dense
    signal's)."""
    vocab = decoder.vocab
    if probs is None:
        scores = logits.astype(mx.float32)
        probs = mx.softmax(scores, axis=-1) if vocab is None else vocab.softmax(scores)
    top, idx = top_k(probs, k)
    if vocab is not None:
        top, idx = vocab.global_top_k(top, idx + vocab.start)
    weights = (top / top.sum(axis=-1, keepdims=True)).astype(dtype)
    if vocab is None:
        rows = decoder.embed_tokens(idx).astype(dtype)
        return (weights[..., None] * rows).sum(axis=-2) * mx.array(decoder.embed_scale, dtype=dtype)
    local, inside = vocab.localize(idx)
    rows = decoder.embed_tokens(local).astype(dtype) * inside[..., None].astype(dtype)
    signal = all_sum((weights[..., None] * rows).sum(axis=-2), vocab.group)
    return signal * mx.array(decoder.embed_scale, dtype=dtype)


def embedding_matmul(embed: nn.Module, probs: mx.array) -> mx.array:
    """probs (..., V) @ E (V, H) for a plain or quantized embedding table."""
    if isinstance(embed, nn.QuantizedEmbedding):
        return mx.quantized_matmul(
            probs, embed.weight, embed.scales, embed.biases, transpose=False,
            group_size=embed.group_size, bits=embed.bits, mode=embed.mode,
        )
    return probs @ embed.weight


class Decoder(nn.Module):
    vocab = None  # a `sharding.VocabShard` once sharded: this rank's rows of the tied table

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)
        self.embed_scale = math.sqrt(args.hidden_size)

    def embed(self, ids: mx.array) -> mx.array:
        h = self.embed_tokens(ids) if self.vocab is None else self.vocab.embed(self.embed_tokens, ids)
        # The reference casts sqrt(hidden) to the weight dtype first (53.0 in bf16, not 53.07).
        return h * mx.array(self.embed_scale, dtype=h.dtype)

    def soft_embed(self, logits: mx.array, dtype: mx.Dtype, probs: mx.array | None) -> mx.array:
        if probs is None or dtype != mx.float32:
            # The reference rounds the logits to the embedding dtype before its fp32 softmax.
            rounded = logits.astype(dtype).astype(mx.float32)
            probs = mx.softmax(rounded, axis=-1) if self.vocab is None else self.vocab.softmax(rounded)
        probs = probs.astype(dtype)
        signal = embedding_matmul(self.embed_tokens, probs)
        # Sharded, `logits` is this rank's vocabulary slice and the product a partial sum.
        signal = signal if self.vocab is None else all_sum(signal, self.vocab.group)
        return signal * mx.array(self.embed_scale, dtype=dtype)


class EncoderLayerScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderLanguageModel(nn.Module):
    """The encoder's only own text weights: one scalar per layer."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [EncoderLayerScalar() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs, with_vision: bool):
        super().__init__()
        self.language_model = EncoderLanguageModel(args)
        if with_vision:
            self.vision_tower = VisionTower(args.vision_config)
            self.embed_vision = VisionEmbedder(args.vision_config, args.hidden_size)


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: ModelArgs, with_vision: bool):
        super().__init__()
        self.encoder = Encoder(args, with_vision)
        self.decoder = Decoder(args)


def image_mask(images: mx.array, T: int) -> mx.array:
    """Boolean (B, 1, L, T) mask letting each token of an image see every token of the same
    image (`use_bidirectional_attention: "vision"`), in full and sliding layers alike.
    `images` (B, L) numbers the images of the chunk's tokens, -1 for text; the T - L keys
    before the chunk are cached text or whole earlier images (a chunk never splits one)."""
    B, L = images.shape
    keys = mx.concatenate([mx.full((B, T - L), -1, dtype=images.dtype), images], axis=1)
    same = (images[:, :, None] == keys[:, None, :]) & (images[:, :, None] >= 0)
    return same[:, None]


def causal_mask(q_start: int, L: int, k_start: int, T: int, window: int | None) -> mx.array:
    """Boolean (L, T) mask: query at q_start+i sees key k_start+j when it is not in the
    future and, for sliding layers, lies within the last `window` positions."""
    q = mx.arange(q_start, q_start + L)[:, None]
    k = mx.arange(k_start, k_start + T)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


class Model(nn.Module):
    """DiffusionGemma for block diffusion (text)."""

    def __init__(self, args: ModelArgs, text_only: bool = False):
        super().__init__()
        self.args = args
        self.model = DiffusionGemmaModel(args, with_vision=args.vision_config is not None and not text_only)
        self.prefill_step_size = 512
        self._image_features: dict[str, mx.array] = {}
        # Per-expert GEMMs beat gather_mm on the CPU backend; on a GPU gather_mm wins and
        # needs no host synchronisation.
        self.moe_grouped = mx.default_device().type == mx.DeviceType.cpu

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.decoder.layers

    @property
    def vocab_shard(self):
        """This rank's `sharding.VocabShard` (None unsharded): `denoise` then returns logits
        for its vocabulary slice only."""
        return self.model.decoder.vocab

    def shard(self, group) -> None:
        """Split this model in place across the ranks of an `mx.distributed` group (tensor
        parallel: heads, MLP and expert widths, vocabulary); see `models/sharding.py`."""
        from .sharding import shard

        shard(self, group)

    def make_cache(self, keep: int | None = None) -> list:
        """One cache per layer; sliding layers store `keep` positions (at least window - 1)."""
        return [
            SlidingCache(self.args.sliding_window, keep) if t == "sliding_attention" else FullCache()
            for t in self.args.layer_types
        ]

    def encode(self, input_ids: mx.array, cache: list, image_features: list[mx.array] | None = None) -> None:
        """Run the causal encoder over `input_ids` (B, L), appending to `cache` in chunks.

        `image_features` (from `embed_images`) replace the embeddings of the image tokens,
        one array per run of image tokens in row-major order; a chunk never ends inside an
        image, whose tokens attend to each other both ways.
        """
        if not image_features:
            for start in range(0, input_ids.shape[1], self.prefill_step_size):
                self.encode_chunk(input_ids[:, start : start + self.prefill_step_size], cache)
                mx.eval([c.state for c in cache])
            return
        placed = place_images(np.array(input_ids), image_features, self.args.image_token_id)
        for start, end in placed.chunks(self.prefill_step_size):
            self.encode_chunk(input_ids[:, start:end], cache, placed.chunk(start, end))
            mx.eval([c.state for c in cache])

    def encode_chunk(self, input_ids: mx.array, cache: list, images: "ImageChunk | None" = None) -> None:
        """One causal encoder pass over `input_ids`, appending to `cache` unevaluated (so
        training can differentiate through the cached keys and values)."""
        decoder = self.model.decoder
        x = decoder.embed(input_ids)
        groups = None
        if images is not None:
            x = mx.where(images.groups[..., None] >= 0, images.features[images.rows].astype(x.dtype), x)
            groups = images.groups
        scalars = self.model.encoder.language_model.layers
        last = len(self.layers) - 1
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            x = layer.attend(x, c, decoding=False, images=groups)
            # Only the caches matter: the last layer's feed-forward output is never read.
            if i < last:
                x = layer.feed_forward(x, scalars[i].layer_scalar, self.moe_grouped)

    def embed_images(self, images) -> list[mx.array]:
        """Features (soft tokens, hidden) in the text width of each `PreparedImage`, from the
        vision tower and its embedder. The features of the last few images are kept, so an
        image a conversation carries runs through the tower once."""
        from ..images import check_takes_images

        check_takes_images(self)
        encoder = self.model.encoder
        out = []
        for image in images:
            features = self._image_features.pop(image.digest, None)
            if features is None:
                soft = encoder.vision_tower(mx.array(image.pixels)[None], mx.array(image.positions)[None], image.grid)
                features = encoder.embed_vision(soft)[0]
                mx.eval(features)
            # Most recently used last; the oldest beyond the limit are dropped.
            self._image_features[image.digest] = features
            while len(self._image_features) > IMAGE_FEATURES_KEPT:
                self._image_features.pop(next(iter(self._image_features)))
            out.append(features)
        return out

    def denoise(
        self,
        canvas_ids: mx.array,
        cache: list,
        self_conditioning_logits: mx.array | None = None,
        self_conditioning_probs: mx.array | None = None,
        capped: bool = True,
        self_conditioning_top_k: int | None = None,
    ) -> mx.array:
        """Float32 softcapped logits (B, canvas, vocab) for a canvas after the cached prefix.

        `self_conditioning_logits` are the previous step's temperature-scaled logits, or None
        on a canvas's first step. A float32 model may be handed their softmax as
        `self_conditioning_probs` to skip recomputing it. The cache is not changed.
        `capped=False` returns the head's logits before the softcap, for a sampler that fuses
        the cap into its own pass over the vocabulary. `self_conditioning_top_k` builds the
        signal from each position's k most probable tokens only (a fast-mode approximation).
        """
        decoder = self.model.decoder
        x = decoder.embed(canvas_ids)
        signal = None
        if self_conditioning_logits is not None:
            if self_conditioning_top_k:
                signal = top_k_soft_embed(decoder, self_conditioning_logits, self_conditioning_probs,
                                          self_conditioning_top_k, x.dtype)
            else:
                signal = decoder.soft_embed(self_conditioning_logits, x.dtype, self_conditioning_probs)
        x = decoder.self_conditioning(x, signal)
        for layer, c in zip(self.layers, cache):
            x = layer.feed_forward(layer.attend(x, c, decoding=True), layer.layer_scalar, self.moe_grouped)
        x = decoder.norm(x)
        logits = decoder.embed_tokens.as_linear(x)
        return softcap(logits, mx.array(self.args.final_logit_softcapping)) if capped else logits

    def sanitize(self, weights: dict) -> dict:
        """Map checkpoint tensor names (HF release, `save_pretrained`, mlx-vlm) to this model's.

        Pure renaming and dropping: values pass through untouched, so it also maps header
        metadata. Tied copies (lm_head, encoder text weights) and RoPE buffers are dropped.
        """
        with_vision = "vision_tower" in self.model.encoder
        out = {}
        for name, value in weights.items():
            if _is_tied_or_buffer(name):
                continue
            if not with_vision and name.startswith(VISION_PREFIXES):
                continue
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                name += ".weight"
            out[name] = value
        return out

    @property
    def quant_predicate(self):
        """Default mixed recipe: routed experts at the requested bits; attention, dense MLP,
        router, self-conditioning and the tied embedding/head at 8-bit, group 64; norms,
        scalars and the vision tower stay unquantized."""

        def predicate(path: str, module: nn.Module):
            if not hasattr(module, "to_quantized") or path.startswith(VISION_PREFIXES):
                return False
            if ".experts." in path:
                return True
            return {"group_size": 64, "bits": 8}

        return predicate


VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
IMAGE_FEATURES_KEPT = 8


@dataclass
class ImageChunk:
    """The image tokens of one encoder chunk: `groups` (B, L) numbers each token's image
    (-1 for text), `rows` (B, L) indexes its feature row in `features` (N, hidden)."""

    groups: mx.array
    rows: mx.array
    features: mx.array


@dataclass
class PlacedImages:
    """Where a prompt's image features go (see `place_images`)."""

    groups: np.ndarray
    rows: np.ndarray
    features: mx.array

    def chunks(self, step: int):
        """(start, end) chunks of about `step` tokens, each extended to end after an image
        it would otherwise cut (the image's tokens must see each other in one pass)."""
        L, start = self.groups.shape[1], 0
        while start < L:
            end = min(start + step, L)
            while end < L and ((self.groups[:, end - 1] >= 0) & (self.groups[:, end - 1] == self.groups[:, end])).any():
                end += 1
            yield start, end
            start = end

    def chunk(self, start: int, end: int) -> ImageChunk:
        return ImageChunk(mx.array(self.groups[:, start:end]), mx.array(self.rows[:, start:end]), self.features)


def place_images(ids: np.ndarray, features: list[mx.array], image_token_id: int) -> PlacedImages:
    """Match each run of image tokens in `ids` (B, L) to the next of `features`, checking
    that the runs and the images agree in number and length."""
    B, L = ids.shape
    groups = np.full((B, L), -1, dtype=np.int32)
    rows = np.zeros((B, L), dtype=np.int32)
    runs = []
    for b in range(B):
        is_image = np.concatenate([[False], ids[b] == image_token_id, [False]])
        edges = np.flatnonzero(is_image[1:] != is_image[:-1])
        for g, (start, end) in enumerate(zip(edges[::2], edges[1::2])):
            groups[b, start:end] = g
            runs.append((b, start, end))
    if len(runs) != len(features):
        raise UserError(f"the prompt holds {len(runs)} image(s) but {len(features)} were given; give one per image")
    offset = 0
    for (b, start, end), f in zip(runs, features):
        if f.shape[0] != end - start:
            raise UserError(
                f"an image of {f.shape[0]} soft tokens was given for {end - start} image tokens in the prompt; "
                "expand each placeholder to the image's soft tokens (see images.expand_image_tokens)"
            )
        rows[b, start:end] = np.arange(offset, offset + end - start)
        offset += end - start
    return PlacedImages(groups, rows, mx.concatenate(features, axis=0))


def _is_tied_or_buffer(name: str) -> bool:
    if name == "lm_head.weight" or "rotary_emb" in name:
        return True
    encoder_text = name.startswith("model.encoder.language_model.")
    return encoder_text and not name.endswith(".layer_scalar")
