"""No drift: many generations in one process at equal context keep a flat step time, and
no compiled function is traced again after the first generation.

`mx.compile` is wrapped before the package is imported, so every trace of every compiled
function (a trace runs the Python body; cached calls do not) is counted by name. Each
generation is a fresh cache, the same prompt length, one canvas of a fixed number of
steps (the stop test is disabled) and its own seed.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/drift.py --generations 100 --out benchmarks/results/drift.json
"""

import argparse
import functools
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx

TRACES = Counter()
_compile = mx.compile


def counting_compile(fun=None, **kwargs):
    """mx.compile, with a counter bumped whenever MLX traces (runs) the Python body."""
    if fun is None:
        return functools.partial(counting_compile, **kwargs)

    @functools.wraps(fun)
    def traced(*args, **kw):
        TRACES[fun.__qualname__] += 1
        return fun(*args, **kw)

    return _compile(traced, **kwargs)


mx.compile = counting_compile

from mlx_diffusiongemma import Model, ModelArgs, generate_step  # noqa: E402  (after the patch)
from mlx_diffusiongemma.models.tiny import tiny_config  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
             num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=128)
CANVAS, PROMPT, STEPS = 64, 64, 8


def one_generation(model, prompt, seed: int, **settings) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each denoising step after the first of one canvas."""
    times, wall, cpu = [], None, None
    for event in generate_step(model, prompt, seed=seed, max_denoising_steps=STEPS, confidence_threshold=1e-30,
                               max_tokens=CANVAS, **settings):
        now, now_cpu = time.perf_counter(), time.process_time()
        if event.committed is None and wall is not None:
            times.append((now - wall, now_cpu - cpu))
        wall, cpu = now, now_cpu
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--fast", action="store_true", help="run the fast mode instead of the default sampler")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drift.json"))
    args = parser.parse_args()
    mx.random.seed(0)
    model = Model(ModelArgs.from_config(tiny_config(CANVAS, vision=False, **SHAPE)))
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, SHAPE["vocab_size"], (PROMPT,)).tolist()
    settings = dict(fast=True) if args.fast else {}
    rows, traces = [], []
    for g in range(args.generations):
        steps = one_generation(model, prompt, g, **settings)
        rows.append(dict(wall=statistics.median(w for w, _ in steps), cpu=statistics.median(c for _, c in steps)))
        traces.append(sum(TRACES.values()))
    n = min(10, len(rows) // 2)
    first, last = rows[:n], rows[-n:]
    med = lambda rs, k: statistics.median(r[k] for r in rs) * 1000
    summary = dict(
        generations=args.generations, fast=args.fast, load=__import__("os").getloadavg(),
        first_wall_ms=med(first, "wall"), last_wall_ms=med(last, "wall"),
        first_cpu_ms=med(first, "cpu"), last_cpu_ms=med(last, "cpu"),
        traces_after_first=traces[0], traces_after_last=traces[-1], traces_by_function=dict(TRACES),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(summary=summary, per_generation=rows, traces=traces), indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
