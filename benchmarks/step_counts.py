"""Counts that hold on any machine: host synchronisations and passes over the vocabulary
per denoising step, for the reference loop (`generate._denoise_canvas`) and the fused one
(`steps.denoise_canvas`), counted by instrumenting them, not timed.

- Host synchronisations: every call that waits for the device or reads an array back
  (`mx.eval`, `mx.async_eval`, `.tolist()`, `.item()`) made during steps of
  `generate_step`, caught with `sys.setprofile` and split by the file that made it (the
  MoE's per-expert GEMMs on the CPU read the routing back once per layer; on a GPU the
  model uses `gather_mm` and makes none).
- Passes over the vocabulary: the kernels of one step's graph (`mx.export_to_dot`, after
  `mx.compile`'s fusion) that read an array with the vocabulary as its last axis: the
  graph is walked from the head's logits, views (broadcasts, reshapes) not counted; the
  head GEMM that writes the logits and the self-conditioning GEMM that reads the
  probabilities next step are added, one each.

    python benchmarks/step_counts.py
"""

import argparse
import ast
import functools
import importlib
import linecache
import re
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx

from mlx_diffusiongemma import Model, ModelArgs, generate_step
from mlx_diffusiongemma.models.diffusion_gemma import softcap
from mlx_diffusiongemma.models.tiny import tiny_config
from mlx_diffusiongemma.sample import capped_sampler_step, reveal_confident, sampler_step

generate_module = importlib.import_module("mlx_diffusiongemma.generate")
SYNC_CALLS = re.compile(r"mx\.eval\(|mx\.async_eval\(|\.tolist\(\)|\.item\(\)")
VIEWS = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Slice", "StopGradient", "Split"}


def small_model(layers: int = 4) -> Model:
    mx.random.seed(0)
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    model = Model(ModelArgs.from_config(tiny_config(32, vision=False, layer_types=types, vocab_size=1024)))
    mx.eval(model.parameters())
    return model


def count_syncs(model, old: bool, steps: int = 6, **settings) -> Counter:
    """Host synchronisations per step over `steps` steps of one canvas, by calling file:
    the package's executed lines that call `mx.eval`, `mx.async_eval`, `.tolist()` or
    `.item()` (MLX's functions are not Python builtins, so a line tracer counts them)."""
    if old:
        generate_module._canvas_loop, saved = (lambda m, s: generate_module._denoise_canvas), generate_module._canvas_loop
    counts = Counter()
    package = str(Path(generate_module.__file__).parent)
    last = {}

    def trace(frame, event, arg):
        if not frame.f_code.co_filename.startswith(package):
            return None
        if event == "call":
            last[id(frame)] = None  # frame ids are reused: forget a dead frame's statement
        elif event == "line" and not frame.f_code.co_name.startswith("<"):
            span = statement_span(frame.f_code.co_filename, frame.f_lineno)
            # A statement over several lines reports its first line again: count it once.
            if last.get(id(frame)) != span:
                last[id(frame)] = span
                text = "".join(linecache.getline(frame.f_code.co_filename, i) for i in range(span[0], span[1] + 1))
                for call in SYNC_CALLS.findall(text):
                    counts[f"{Path(frame.f_code.co_filename).name}:{call}"] += 1
        return trace

    events = generate_step(model, [5, 6, 7, 8], seed=0, max_denoising_steps=steps + 1, confidence_threshold=1e-30,
                           max_tokens=32, **settings)
    next(events)  # the prompt's encoding and the first step, with nothing to self-condition on
    sys.settrace(trace)
    try:
        for _ in range(steps):
            next(events)
    finally:
        sys.settrace(None)
        if old:
            generate_module._canvas_loop = saved
    return Counter({k: v / steps for k, v in counts.items()})


@functools.cache
def statements(path: str) -> list[tuple[int, int]]:
    """(first, last) line of each simple statement and of each compound statement's header."""
    spans = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.stmt):
            body = getattr(node, "body", None)
            end = body[0].lineno - 1 if isinstance(body, list) and body and isinstance(body[0], ast.stmt) else node.end_lineno
            spans.append((node.lineno, max(end, node.lineno)))
    return spans


def statement_span(path: str, line: int) -> tuple[int, int]:
    """The innermost statement span holding `line`."""
    holding = [s for s in statements(path) if s[0] <= line <= s[1]]
    return min(holding, key=lambda s: s[1] - s[0]) if holding else (line, line)


def dot_passes(outputs, source_primitive: str) -> Counter:
    """Kernels reading a vocabulary-wide array in the graph of `outputs`, whose vocabulary-
    wide source is the single node labelled `source_primitive`."""
    path = Path("/tmp/step_counts.dot")
    mx.export_to_dot(str(path), *outputs)
    text = path.read_text()
    labels = dict(re.findall(r'(\d+) \[label ="([^"]+)"', text))
    inputs, outputs_of = {}, {}
    for a, b in re.findall(r'"?(\w+)"? -> "?(\w+)"?', text):
        if a in labels:
            outputs_of.setdefault(a, []).append(b)
        else:
            inputs.setdefault(b, []).append(a)
    wide = {out for node, label in labels.items() if label == source_primitive for out in outputs_of.get(node, [])}
    passes, changed = Counter(), True
    counted = set()
    while changed:
        changed = False
        for node, label in labels.items():
            if node in counted or not set(inputs.get(node, [])) & wide:
                continue
            counted.add(node)
            changed = True
            if label not in VIEWS:
                passes[label] += 1
            # Elementwise kernels, scans and views keep the vocabulary axis; reductions drop it.
            if not re.match(r"(Max|Min|Sum|ArgReduce|Gather|Matmul|Prod|Logsumexp)", label):
                wide.update(outputs_of.get(node, []))
    return passes


def vocabulary_passes(B=1, L=256, V=16384) -> dict:
    raw_source = mx.random.normal((B, L, V))
    keys = mx.random.split(mx.random.key(0))
    inv_t, bound, pinned = mx.array(1.6), mx.array(0.1), mx.zeros((B, L), dtype=mx.bool_)
    cap, zero = mx.array(30.0), mx.array(0.0)
    mx.eval(raw_source, keys)
    raw = mx.abs(raw_source)  # a marker node standing for the head GEMM's output

    old = sampler_step(softcap(raw, cap), inv_t, bound, keys, pinned)
    new = capped_sampler_step(raw, cap, zero, inv_t, bound, keys, pinned)
    scaled, probs, argmax, canvas, accepted, entropy = new
    revealed = mx.zeros((B, L), dtype=mx.bool_)
    confident = reveal_confident(probs, canvas, revealed, mx.array(0.9), mx.array(False))
    return {
        "reference loop": dot_passes(list(old), "Abs"),
        "fused loop": dot_passes(list(new), "Abs"),
        "fused loop, confidence sampler": dot_passes(list(new) + [confident], "Abs"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    model = small_model()
    print("## host synchronisations per step (calls per step, by calling file)")
    for name, old, settings in [("reference loop", True, {}), ("fused loop", False, {}),
                                ("fused loop, fast mode", False, dict(fast=True))]:
        for device_like, grouped in (("CPU (per-expert GEMMs)", True), ("GPU path (gather_mm)", False)):
            model.moe_grouped = grouped
            c = count_syncs(model, old, **settings)
            total = sum(c.values())
            print(f"{name:32s} {device_like:24s} total {total:4.1f}  " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(c.items())))
    print("\n## passes over the vocabulary per step, sampler side (kernels reading a (B, L, V) array)")
    for name, passes in vocabulary_passes().items():
        print(f"{name:32s} {sum(passes.values()):2d} + head GEMM + self-conditioning GEMM = "
              f"{sum(passes.values()) + 2:2d}   {dict(passes)}")


if __name__ == "__main__":
    main()
