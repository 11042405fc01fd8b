"""A long chat on a small random DiffusionGemma: does the per-step denoising time stay
flat over the turns, and how much prompt does each turn encode?

Runs the same seeded conversation twice in one process through `ChatSession`: once
reusing the encoder cache across turns (the default), once clearing it before every turn
(the whole history re-encoded). Per turn it reports the prompt length, the tokens reused
from the cache and encoded, the prompt encoding time, and the median time of a denoising
step (the interval between two consecutive steps of one canvas, so encoder passes are
excluded).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python benchmarks/chat_session.py --turns 20

Step times are medians, so other load on the machine moves single steps, not the trend;
CPU time (all threads) is reported beside wall time because it is less distorted by it.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import save_random_reference

from mlx_diffusiongemma import generate_step, load
from mlx_diffusiongemma.chat import ChatSession
from mlx_diffusiongemma.demos.sudoku.tokenizer import build_tokenizer

CANVAS = 32
SHAPE = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    global_head_dim=128, num_global_key_value_heads=1,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=128,
    num_experts=16, top_k_experts=2, max_position_embeddings=8192,
)
MESSAGE = "Turn {}: tell me one more thing about block diffusion, briefly."


def write_model(path: Path) -> Path:
    """A random checkpoint saved by transformers, with a small Gemma-4-style tokenizer."""
    save_random_reference(path, CANVAS, SHAPE)
    build_tokenizer(path, vocab_size=SHAPE["vocab_size"])
    return path


def timed_turn(session: ChatSession, text: str) -> dict:
    """Run one reply; return its statistics."""
    events, last = [], None
    start = time.perf_counter()
    for last in session.reply(text):
        events.append((last.canvas, last.committed is None, time.perf_counter(), time.process_time()))
    # Consecutive denoising steps of one canvas: no encoder pass between them.
    pairs = [(a, b) for a, b in zip(events, events[1:]) if a[0] == b[0] and a[1] and b[1]]
    turn = session.last_turn
    prompt_s = last.prompt_tokens / last.prompt_tps
    return dict(
        prompt=turn.prompt_tokens, reused=turn.reused_tokens, encoded=turn.encoded_tokens,
        prompt_ms=1e3 * prompt_s, forwards=last.decoder_forwards,
        # The turn's first step: in turn 1 it includes tracing and compiling the sampler.
        first_step_ms=1e3 * (events[0][2] - start - prompt_s),
        step_ms=1e3 * statistics.median(b[2] - a[2] for a, b in pairs),
        step_cpu_ms=1e3 * statistics.median(b[3] - a[3] for a, b in pairs), cached=len(session.prompt_cache.ids),
        text=session.messages[-1]["content"],
    )


def run_session(model, tokenizer, turns: int, reuse: bool, settings: dict) -> tuple[list[dict], ChatSession]:
    session = ChatSession(model, tokenizer, **settings)
    rows = []
    for i in range(turns):
        if not reuse:
            session.prompt_cache.clear()
        rows.append(timed_turn(session, MESSAGE.format(i + 1)))
    return rows, session


def step_cpu_ms(model, ids: list[int], steps: int) -> float:
    """Median CPU time of one denoising step right after encoding `ids` into a fresh cache."""
    stamps = [time.process_time() for _ in generate_step(
        model, ids, max_tokens=CANVAS, max_denoising_steps=steps, seed=0, stability_threshold=steps)]
    return 1e3 * statistics.median(b - a for a, b in zip(stamps[:-2], stamps[1:-1]))


def control(model, first: list[int], last: list[int], steps: int, rounds: int = 3) -> dict:
    """Step time at the first and the last turn's context length, each in a fresh cache and
    interleaved, so a longer context and drift over a long session can be told apart."""
    short, long = [], []
    for _ in range(rounds):
        short.append(step_cpu_ms(model, first, steps))
        long.append(step_cpu_ms(model, last, steps))
    return {"fresh_step_cpu_ms_first_context": round(statistics.median(short), 2),
            "fresh_step_cpu_ms_last_context": round(statistics.median(long), 2)}


def report(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print("turn  prompt  reused  encoded  prompt ms  forwards  1st step ms  step ms  step cpu ms  cached")
    for i, r in enumerate(rows, 1):
        print(f"{i:4d}  {r['prompt']:6d}  {r['reused']:6d}  {r['encoded']:7d}  {r['prompt_ms']:9.1f}  "
              f"{r['forwards']:8d}  {r['first_step_ms']:11.1f}  {r['step_ms']:7.2f}  {r['step_cpu_ms']:11.2f}  "
              f"{r['cached']:6d}")


def summary(reuse: list[dict], fresh: list[dict]) -> dict:
    def ratio(key):
        head = statistics.median(r[key] for r in reuse[:3])
        tail = statistics.median(r[key] for r in reuse[-3:])
        return {f"{key}_first3": round(head, 2), f"{key}_last3": round(tail, 2), f"{key}_last_over_first": round(tail / head, 3)}

    return dict(
        **ratio("step_ms"), **ratio("step_cpu_ms"),
        encoded_with_reuse=sum(r["encoded"] for r in reuse), encoded_without=sum(r["encoded"] for r in fresh),
        prompt_ms_with_reuse=round(sum(r["prompt_ms"] for r in reuse), 1),
        prompt_ms_without=round(sum(r["prompt_ms"] for r in fresh), 1),
        same_replies=[r["text"] for r in reuse] == [r["text"] for r in fresh],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=2 * CANVAS)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    settings = dict(max_tokens=args.max_tokens, max_denoising_steps=args.steps, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load(write_model(Path(tmp)))
    reuse, session = run_session(model, tokenizer, args.turns, True, settings)
    fresh, _ = run_session(model, tokenizer, args.turns, False, settings)
    report(reuse, "reusing the encoder cache (ChatSession default)")
    report(fresh, "clearing the cache before every turn")
    first = session.prompt_ids(session.messages[:1])
    last = session.prompt_ids(session.messages[:-1])
    print("\n" + json.dumps({**summary(reuse, fresh), **control(model, first, last, args.steps)}))


if __name__ == "__main__":
    main()
