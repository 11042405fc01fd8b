"""The server under load: 8 concurrent streaming clients x 5 requests each against a real
`serve` process on localhost, on the shipped Sudoku model, compared with the same requests
run one at a time through the server and through the Python API in one process.

Reports requests served, errors, p50/p95 latency per request, time to the first content
chunk (and to the first draft event with `stream_drafts`), whether the concurrent outputs
equal the sequential ones (same seeds), and the server's overhead per request: sequential
server latency minus Python API latency, the two run alternately request by request.

    python benchmarks/server_bench.py --clients 8 --requests 5 --out benchmarks/results/server_bench.json
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path


from mlx_diffusiongemma import GenerationSettings, load, stream_generate
from mlx_diffusiongemma.demos.sudoku import puzzles
from mlx_diffusiongemma.demos.sudoku.solver import normalize

ROOT = Path(__file__).resolve().parents[1]
SUDOKU_MODEL = ROOT / "mlx_diffusiongemma" / "demos" / "sudoku" / "model"
sys.path.insert(0, str(ROOT / "tests"))
from server_fixtures import ServerProcess  # noqa: E402


def requests_for(n: int, blanks: int) -> list[dict]:
    """`n` Sudoku puzzles as chat requests, each with its own seed."""
    return [dict(messages=[{"role": "user", "content": puzzles.format_grid(normalize(p))}], seed=1000 + i,
                 puzzle=p) for i, (p, _) in enumerate(puzzles.make_dataset(7, n, blanks))]


def one_request(client, model_id: str, req: dict, drafts: bool = False) -> dict:
    """Stream one request; its latency, time to first content chunk (and first draft
    event with `drafts`) and text."""
    tic = time.perf_counter()
    first, first_draft, text = None, None, ""
    stream = client.chat.completions.create(model=model_id, messages=req["messages"], seed=req["seed"], stream=True,
                                            extra_body={"stream_drafts": drafts})
    for chunk in stream:
        if chunk.object == "chat.completion.draft":
            first_draft = first_draft or time.perf_counter() - tic
        elif chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - tic
            text += chunk.choices[0].delta.content
    return dict(latency=time.perf_counter() - tic, first_chunk=first, first_draft=first_draft, text=text)


def run_concurrent(client, model_id: str, reqs: list[dict], clients: int) -> tuple[list, list]:
    per_client = len(reqs) // clients
    results, errors = [None] * len(reqs), []

    def worker(c: int) -> None:
        for r in range(per_client):
            i = c * per_client + r
            try:
                results[i] = one_request(client, model_id, reqs[i])
            except Exception as e:  # noqa: BLE001  (counted as an error)
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def python_api(model, tokenizer, req: dict) -> dict:
    """One request through `stream_generate` in this process (a fresh cache)."""
    ids = tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True, enable_thinking=False,
                                        tokenize=True)
    settings = GenerationSettings.resolve(model, seed=req["seed"])
    tic, text = time.perf_counter(), ""
    for r in stream_generate(model, tokenizer, ids, settings=settings):
        text += r.text
    return dict(latency=time.perf_counter() - tic, text=text)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summary(results: list[dict]) -> dict:
    lat = [r["latency"] for r in results if r]
    first = [r["first_chunk"] for r in results if r and r.get("first_chunk") is not None]
    out = dict(served=len(lat), p50_latency_s=pct(lat, 0.5), p95_latency_s=pct(lat, 0.95))
    if first:
        out.update(p50_first_chunk_s=pct(first, 0.5), p95_first_chunk_s=pct(first, 0.95))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--blanks", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    reqs = requests_for(args.clients * args.requests, args.blanks)

    log = Path("/tmp/server_bench.log")
    server = ServerProcess(SUDOKU_MODEL, log, "--max-queue", str(args.clients))
    try:
        client = server.client(timeout=600)
        model_id = client.models.list().data[0].id
        one_request(client, model_id, reqs[0])  # warm-up
        tic = time.perf_counter()
        concurrent, errors = run_concurrent(client, model_id, reqs, args.clients)
        wall = time.perf_counter() - tic
        # One at a time, each request through the server and then the Python API, so that
        # both see the same load on this shared machine.
        model, tokenizer = load(SUDOKU_MODEL)
        python_api(model, tokenizer, reqs[0])  # warm-up
        sequential, api = [], []
        for r in reqs:
            sequential.append(one_request(client, model_id, r))
            api.append(python_api(model, tokenizer, r))
        drafted = [one_request(client, model_id, r, drafts=True) for r in reqs[:5]]
        health = server.health()
    finally:
        server.stop()

    same = sum(c is not None and c["text"] == s["text"] for c, s in zip(concurrent, sequential))
    same_api = sum(s["text"] == a["text"] for s, a in zip(sequential, api))
    solved = sum(puzzles.is_solved(puzzles.parse_grid(s["text"]), r["puzzle"]) for s, r in zip(sequential, reqs))
    api_p50 = statistics.median(a["latency"] for a in api)
    seq = summary(sequential)
    report = dict(
        command=" ".join(sys.argv), clients=args.clients, requests_per_client=args.requests,
        concurrent=dict(**summary(concurrent), errors=len(errors), wall_s=wall,
                        requests_per_s=len(reqs) / wall, error_messages=errors[:5]),
        sequential_server=seq, python_api=dict(p50_latency_s=api_p50, p95_latency_s=pct([a["latency"] for a in api], 0.95)),
        overhead_per_request_s=seq["p50_latency_s"] - api_p50,
        paired_overhead_p50_s=statistics.median(s["latency"] - a["latency"] for s, a in zip(sequential, api)),
        latencies=dict(concurrent=[c and round(c["latency"], 4) for c in concurrent],
                       sequential_server=[round(s["latency"], 4) for s in sequential],
                       python_api=[round(a["latency"], 4) for a in api]),
        concurrent_equal_to_sequential=f"{same}/{len(reqs)}", server_equal_to_python_api=f"{same_api}/{len(reqs)}",
        sudoku_solved=f"{solved}/{len(reqs)}", server_counters=health,
        with_drafts=dict(requests=len(drafted), p50_first_draft_s=pct([d["first_draft"] for d in drafted], 0.5),
                         p50_first_chunk_s=pct([d["first_chunk"] for d in drafted], 0.5),
                         equal_text=sum(d["text"] == s["text"] for d, s in zip(drafted, sequential))),
    )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
