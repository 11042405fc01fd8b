"""Host time to build one denoising step's graph for the full-size model, never evaluated.

Launching the next step while the stop test is read (async evaluation) can hide at most the
time Python and MLX spend building a step's graph; it would cost one wasted step per canvas
(the step launched after the canvas stops). This measures that build time on the released
config (30 layers, mixed 4-bit layers as the converter plans them): the model is the
unevaluated skeleton, the prompt's keys and values are cached unevaluated, and each step's
graph (decoder forward with self-conditioning on the GPU's `gather_mm` MoE path, then the
fused sampler pass) is chained onto the previous one without ever being evaluated, so no
weight is ever materialised and the figure is host time only, on any machine.

    python benchmarks/graph_build.py --steps 20 --out benchmarks/results/graph_build.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
from full_size_memory import quantized_skeleton

from mlx_diffusiongemma.sample import capped_sampler_step

PROMPT, CANVAS = 512, 256


def build_step(model, cache, canvas, scaled, probs, key):
    """One step's graph, as `steps.denoise_canvas` builds it (entropy rule, no pins)."""
    raw = model.denoise(canvas, cache, scaled, self_conditioning_probs=probs, capped=False)
    cap = mx.array(model.args.final_logit_softcapping, dtype=mx.float32)
    zero, inv_t, bound = (mx.array(v, dtype=mx.float32) for v in (0.0, 1.0, 0.1))
    pinned = mx.zeros(canvas.shape, dtype=mx.bool_)
    return capped_sampler_step(raw, cap, zero, inv_t, bound, mx.random.split(key), pinned)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/graph_build.json"))
    args = parser.parse_args()
    model = quantized_skeleton()
    model.moe_grouped = False  # the GPU path: no routing read inside the forward
    cache = model.make_cache()
    model.encode_chunk(mx.zeros((1, PROMPT), dtype=mx.int32), cache)
    canvas, scaled, probs = mx.zeros((1, CANVAS), dtype=mx.int32), None, None
    times = []
    for n in range(args.steps + 1):
        tic = time.perf_counter()
        scaled, probs, _, canvas, _, _ = build_step(model, cache, canvas, scaled, probs, mx.random.key(n))
        times.append(time.perf_counter() - tic)
    # The first build traces the compiled sampler and builds no self-conditioning.
    result = dict(layers=model.args.num_hidden_layers, steps=args.steps, first_ms=1000 * times[0],
                  median_ms=1000 * statistics.median(times[1:]), max_ms=1000 * max(times[1:]))
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
