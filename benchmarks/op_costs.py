"""What one denoising step's pieces cost on this machine's MLX CPU backend, at the shapes of
step_bench.py's preset (canvas 256 after a 512-token prompt, hidden 512, vocab 16,384,
8 query heads over 4 key/value heads, 32 experts top-4 of width 256): the GEMMs against
the transcendental passes (exp, tanh) that the logits, the attention softmax and GELU
need, and the same decoder layer's parts. Median CPU seconds of 7 runs after one warm-up,
one thread. Explains where the step's time goes; the ratios, not the absolute times, are
what carries to other CPUs (a GPU computes exp and tanh in hardware).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/op_costs.py --out benchmarks/results/op_costs.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from step_bench import CANVAS, PROMPT, SHAPE, inputs


def cpu_ms(fn, runs: int = 7) -> float:
    mx.eval(fn())
    times = []
    for _ in range(runs):
        t = time.process_time()
        mx.eval(fn())
        times.append(time.process_time() - t)
    return 1000 * sorted(times)[runs // 2]


def primitives() -> dict:
    V, H, I = SHAPE["vocab_size"], SHAPE["hidden_size"], SHAPE["intermediate_size"]
    logits = mx.random.normal((CANVAS, V))
    scores = mx.random.normal((1, SHAPE["num_attention_heads"], CANVAS, PROMPT + CANVAS))
    x, w = mx.random.normal((CANVAS, H)), mx.random.normal((H, I))
    head = mx.random.normal((V, H))
    q = mx.random.normal((1, SHAPE["num_attention_heads"], CANVAS, SHAPE["head_dim"]))
    kv = mx.random.normal((1, SHAPE["num_key_value_heads"], PROMPT + CANVAS, SHAPE["head_dim"]))
    return {
        f"head GEMM {CANVAS}x{H}x{V}": (lambda: x @ head.T, 2 * CANVAS * H * V, None),
        f"dense GEMM {CANVAS}x{H}x{I}": (lambda: x @ w, 2 * CANVAS * H * I, None),
        f"add over the logits ({CANVAS}x{V})": (lambda: logits + 1.0, None, logits.size),
        f"exp over the logits ({CANVAS}x{V})": (lambda: mx.exp(logits), None, logits.size),
        f"tanh over the logits ({CANVAS}x{V})": (lambda: mx.tanh(logits), None, logits.size),
        f"softmax over the logits ({CANVAS}x{V})": (lambda: mx.softmax(logits, axis=-1), None, logits.size),
        f"attention softmax ({scores.shape[1]}x{CANVAS}x{scores.shape[3]})":
            (lambda: mx.softmax(scores, axis=-1), None, scores.size),
        "scaled_dot_product_attention (one layer)":
            (lambda: mx.fast.scaled_dot_product_attention(q, kv, kv, scale=1.0), None, None),
    }


def layer_parts(path: Path) -> dict:
    from mlx_diffusiongemma import load_model

    model = load_model(path)
    prompt, canvas = inputs()
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    canvas = mx.array(canvas, dtype=mx.int32)
    d, layer, c = model.model.decoder, model.layers[0], cache[0]
    x = d.self_conditioning(d.embed(canvas), None)
    h = layer.attend(x, c, decoding=True)
    idx, weights = layer.router(h)
    normed = layer.pre_feedforward_layernorm_2(h)
    mx.eval(x, h, idx, weights, normed)
    return {
        "decoder forward (6 layers + head)": (lambda: model.denoise(canvas, cache), None, None),
        "layer 0: attention block": (lambda: layer.attend(x, c, decoding=True), None, None),
        "layer 0: dense MLP": (lambda: layer.mlp(layer.pre_feedforward_layernorm(h)), None, None),
        "layer 0: experts, per-expert GEMMs (CPU path)": (lambda: layer.experts(normed, idx, weights, True), None, None),
        "layer 0: experts, sorted gather_mm (GPU path)": (lambda: layer.experts(normed, idx, weights, False), None, None),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Written by torch in a process of its own, without the preloaded OpenBLAS.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        subprocess.run([sys.executable, "-c", "from step_bench import write_checkpoint; from pathlib import Path; "
                        f"write_checkpoint(Path({tmp!r}))"], check=True, env=env, cwd=Path(__file__).parent)
        for name, (fn, flops, elements) in {**primitives(), **layer_parts(Path(tmp))}.items():
            ms = cpu_ms(fn)
            rate = f"{flops / ms / 1e6:.1f} GFLOP/s" if flops else f"{1e6 * ms / elements:.2f} ns/element" if elements else ""
            rows.append(dict(part=name, cpu_ms=round(ms, 1), rate=rate))
            print(f"| {name} | {ms:.1f} | {rate} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
