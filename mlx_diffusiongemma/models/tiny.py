"""Small DiffusionGemma configurations for tests, benchmarks and experiments.

`tiny_config` is a `config.json` dict with every architectural feature of the release
(sliding and full attention layers with K=V on the full ones, fewer KV heads on full
layers, proportional RoPE, MoE with a dense branch, a vision tower) at toy sizes; any
`text_config` field can be overridden. The reference (transformers) builds the same model
from it, so parity tests, benchmarks and scripts share one definition.
"""

TINY_TEXT = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    sliding_window=16,
    num_experts=8,
    top_k_experts=2,
    max_position_embeddings=4096,
    use_bidirectional_attention="vision",
    # The reference's defaults, written out so the config also loads without transformers.
    rms_norm_eps=1e-6,
    pad_token_id=0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    },
)
# The reference always builds a vision tower (a full-size one when given none).
TINY_VISION = dict(
    model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, head_dim=16, global_head_dim=16,
)


def tiny_config(canvas_length: int = 8, eos_token_id=(1,), vision: bool = True, **text) -> dict:
    """A `config.json` dict: `TINY_TEXT` with `text` overrides, and the tiny vision tower
    unless `vision` is False."""
    layers = text.get("layer_types")
    if layers is not None:
        text.setdefault("num_hidden_layers", len(layers))
    return dict(
        model_type="diffusion_gemma", canvas_length=canvas_length, eos_token_id=list(eos_token_id),
        text_config={**TINY_TEXT, **text}, vision_config=dict(TINY_VISION) if vision else None,
    )
