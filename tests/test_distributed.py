"""Tensor-parallel DiffusionGemma on 2 and 3 local ranks (`mlx.launch --backend ring`).

One launch per rank count runs `distributed_worker.py` over small random checkpoints
(float32 in the Hugging Face layout, 4-bit converted), whose widths need zero-padding to
whole quantization groups; its results are checked here against this single process.
"""

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import load_model
from mlx_diffusiongemma.convert import convert
from mlx_diffusiongemma.infill import surprises
from mlx_diffusiongemma.sample import sampler_step
from distributed_worker import LEVERS, TOP_K, committed
from reference import make_reference, relative_error
from server_fixtures import launch_command

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
# Widths chosen to need padding: the dense MLP (320 = 5 groups of 64) and the experts
# (192 = 3 groups) do not split into whole groups on 2 ranks, nor the MLP on 3; 12 query
# heads over 6 KV heads split with their KV groups, the single KV head of the full layers
# is replicated; a vocabulary of 250 splits unevenly.
CONFIG = dict(hidden_size=128, intermediate_size=320, moe_intermediate_size=192, num_attention_heads=12,
              num_key_value_heads=6, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
              vocab_size=250, sliding_window=12)
CANVAS = 8
DETERMINISTIC = dict(t_max=2e-3, t_min=1e-3, entropy_bound=1e9, max_denoising_steps=12, max_tokens=3 * CANVAS,
                     eos_token_ids=[])
SAMPLED = (1 / 0.8, 0.1)  # inverse temperature of the first step at the defaults, entropy bound
LAUNCH_TIMEOUT = 420


def launch(n: int, args: list[str], timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`mlx.launch` n ring ranks on 127.0.0.1, killed (whole process group) past `timeout`."""
    cmd = launch_command(n, sys.executable, *args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{n}-rank launch ran past {timeout}s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_reference(root / "f32", seed=3, canvas_length=CANVAS, embed_scale=0.6, **CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in a random checkpoint
        convert(root / "f32", root / "q4")  # experts 4-bit, the rest 8-bit, group 64
    rng = np.random.RandomState(0)
    prompts = [rng.randint(5, 250, n).tolist() for n in (5, 17)]
    canvases = [rng.randint(5, 250, CANVAS).tolist() for _ in prompts]
    return root, prompts, canvases


def single_process(path, prompts, canvases) -> dict:
    """What the unsharded model computes on the job's inputs."""
    model = load_model(path)
    out = {"logits": [], "logits_sc": [], "logits_topk": [], "tokens": [], "surprises": [],
           **{f"{lever}_tokens": [] for lever in LEVERS}}
    for prompt, canvas in zip(prompts, canvases):
        cache = model.make_cache()
        model.encode(mx.array([prompt]), cache)
        logits = model.denoise(mx.array([canvas]), cache)
        out["logits"].append(np.array(logits[0]))
        out["logits_sc"].append(np.array(model.denoise(mx.array([canvas]), cache, logits * 1.25)[0]))
        out["logits_topk"].append(np.array(model.denoise(mx.array([canvas]), cache, logits * 1.25,
                                                         self_conditioning_top_k=TOP_K)[0]))
        out["tokens"].append(committed(model, prompt, canvas, DETERMINISTIC))
        for lever, settings in LEVERS.items():
            out[f"{lever}_tokens"].append(committed(model, prompt, canvas, {**DETERMINISTIC, **settings}))
        out["surprises"].append(surprises(model, prompt, canvas + canvas[::-1]))
    return {k: v if k.endswith("tokens") else np.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def expected(checkpoints):
    root, prompts, canvases = checkpoints
    return {name: single_process(root / name, prompts, canvases) for name in ("f32", "q4")}


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, checkpoints, expected, tmp_path_factory):
    """Results of one launch of `request.param` ranks over both checkpoints."""
    root, prompts, canvases = checkpoints
    out = tmp_path_factory.mktemp(f"ranks{request.param}")
    np.save(out / "sampler_logits.npy", expected["f32"]["logits"] * 3.0)
    job = dict(
        models={"f32": dict(path=str(root / "f32"), sampler=True, in_memory=True), "q4": dict(path=str(root / "q4"))},
        prompts=prompts, canvases=canvases, settings=DETERMINISTIC,
        sampler_logits=str(out / "sampler_logits.npy"), sampler_settings=SAMPLED,
    )
    (out / "job.json").write_text(json.dumps(job))
    proc = launch(request.param, [str(WORKER), str(out / "job.json"), str(out)])
    errors = {p.name: p.read_text() for p in out.glob("rank*.error")}
    assert not errors, f"{errors}\n{proc.stdout[-3000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(request.param)]
    return request.param, out, results


@pytest.mark.parametrize("name", ["f32", "q4"])
@pytest.mark.parametrize("sc", ["", "_sc", "_topk"], ids=["first-step", "self-conditioned", "top-k-self-conditioned"])
def test_decoder_logits_match_single_process(ranks, expected, name, sc):
    n, out, results = ranks
    assert all(r["size"] == n for r in results)
    sharded = np.load(out / f"{name}_logits{sc}.npy")
    assert sharded.shape == expected[name][f"logits{sc}"].shape
    assert relative_error(sharded, expected[name][f"logits{sc}"]) < 1e-4


def test_in_memory_shard_matches_sharded_loading(ranks):
    _, out, _ = ranks
    np.testing.assert_array_equal(np.load(out / "f32_in_memory_logits.npy"), np.load(out / "f32_logits.npy"))


@pytest.mark.parametrize("name", ["f32", "q4"])
def test_generate_commits_single_process_tokens(ranks, expected, name):
    _, _, results = ranks
    assert len(expected[name]["tokens"][0]) == DETERMINISTIC["max_tokens"]
    for r in results:  # every rank commits the same tokens
        assert r[f"{name}_tokens"] == expected[name]["tokens"]


@pytest.mark.parametrize("name", ["f32", "q4"])
@pytest.mark.parametrize("lever", ["confident", "topk"])
def test_speed_levers_on_shards_commit_single_process_tokens(ranks, expected, name, lever):
    _, _, results = ranks
    for r in results:
        assert r[f"{name}_{lever}_tokens"] == expected[name][f"{lever}_tokens"]
    if lever == "confident":
        assert expected[name][f"{lever}_tokens"] != expected[name]["tokens"]
    else:
        # Argmax decoding sees no difference; the top-k signal itself does (logits test above).
        assert relative_error(expected[name]["logits_topk"], expected[name]["logits_sc"]) > 1e-3


@pytest.mark.parametrize("name", ["f32", "q4"])
def test_check_surprises_on_vocabulary_shards_match_single_process(ranks, expected, name):
    # `check` and infill's length search read -log p of given tokens over the whole vocabulary.
    _, _, results = ranks
    for r in results:
        np.testing.assert_allclose(np.array(r[f"{name}_surprises"]), expected[name]["surprises"], rtol=1e-4, atol=1e-4)


def test_heads_split_and_kv_replicated_where_fewer_than_ranks(ranks):
    n, _, results = ranks
    # Sliding layers: 12 query heads and 6 KV heads split; full layers: the one KV head is kept by all.
    assert results[0]["f32_heads"] == [[12 // n, 6 // n], [12 // n, 1], [12 // n, 6 // n], [12 // n, 1]]


def test_sampler_on_vocabulary_shards_matches_full_vocabulary(ranks, tmp_path):
    _, out, results = ranks
    logits = mx.array(np.load(out / "sampler_logits.npy"))
    B, L, _ = logits.shape
    keys = mx.random.split(mx.random.key(7))
    pinned = mx.zeros((B, L), dtype=mx.bool_)
    inv_t, bound = (mx.array(v) for v in SAMPLED)
    _, probs, argmax, canvas, accepted, entropy = sampler_step(logits, inv_t, bound, keys, pinned)
    sampled = sampler_step(logits, inv_t, mx.array(1e9), keys, pinned)[3]
    # A few positions are uncertain, so acceptance and sampling are really exercised.
    assert 0 < np.array(accepted).sum() < B * L and np.array(entropy).max() > 0.5
    # The single-process entropy subtracts terms of the logits' size (~40 here): float32
    # rounding leaves ~1e-5 absolute (the sharded one is centred and more exact).
    atol = 1e-6 * float(mx.abs(logits * inv_t).max())
    for r in results:
        s = r["sampler"]
        np.testing.assert_allclose(s["entropy"], np.array(entropy), rtol=1e-5, atol=atol)
        np.testing.assert_allclose(s["probs"], np.array(probs), rtol=1e-5, atol=1e-7)
        assert s["accepted"] == accepted.tolist() and s["argmax"] == argmax.tolist()
        assert s["sampled"] == sampled.tolist() and s["canvas"] == canvas.tolist()
        confidence = mx.take_along_axis(probs, sampled[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(s["confidence"], np.array(confidence), rtol=1e-5, atol=1e-7)
        assert s == results[0]["sampler"]


LOAD_SCRIPT = (
    "import sys\nimport mlx.core as mx\nfrom mlx_diffusiongemma import UserError, load_model\n"
    "paths = sys.argv[1:]\n"
    "try:\n    load_model(paths[mx.distributed.init().rank() % len(paths)])\nexcept UserError as e:\n"
    "    print('USERERROR', e, file=sys.stderr, flush=True)\n    sys.exit(1)\n"
)


def user_errors(n: int, paths: list[Path], tmp_path: Path) -> list[str]:
    """The one-line errors of `n` ranks loading `paths` (rank r loads paths[r % len])."""
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    proc = launch(n, [str(script), *map(str, paths)], timeout=240)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("USERERROR")]
    assert len(lines) == n and len(set(lines)) == 1, proc.stdout[-3000:]
    return lines


def test_unsplittable_configuration_is_one_line_error_on_every_rank(checkpoints, tmp_path):
    root, _, _ = checkpoints
    lines = user_errors(4, [root / "f32"], tmp_path)  # 12 heads over 6 KV heads: 4 ranks split KV groups
    assert "launch a number of ranks" in lines[0]


def test_ranks_with_different_models_are_one_line_error_on_every_rank(checkpoints, tmp_path):
    root, _, _ = checkpoints
    lines = user_errors(2, [root / "f32", root / "q4"], tmp_path)
    assert "rank 1 loaded a different model than rank 0" in lines[0]


def test_failing_rank_ends_the_launch(checkpoints, tmp_path):
    root, _, _ = checkpoints
    script = tmp_path / "fail.py"
    script.write_text(
        "import sys\nimport mlx.core as mx\nfrom mlx_diffusiongemma import load_model\n"
        "model = load_model(sys.argv[1])\n"
        "if mx.distributed.init().rank() == 1:\n    raise RuntimeError('rank 1 fails')\n"
        "cache = model.make_cache()\nmodel.encode(mx.array([[5, 6, 7]]), cache)\n"
        "mx.eval(model.denoise(mx.array([[5] * 8]), cache))\nprint('UNREACHABLE', flush=True)\n"
    )
    proc = launch(2, [str(script), str(root / "f32")], timeout=240)
    assert "UNREACHABLE" not in proc.stdout and "rank 1 fails" in proc.stdout


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32, mx.uint32])
def test_read_tensor_reads_pieces_at_their_offsets(tmp_path, dtype):
    from mlx_diffusiongemma.models.sharding import Piece, cut_array
    from mlx_diffusiongemma.weights.safetensors import read_header
    from mlx_diffusiongemma.weights.slices import read_tensor

    a = (mx.arange(2 * 6 * 10).reshape(2, 6, 10) * 3).astype(dtype)
    mx.save_safetensors(str(tmp_path / "t.safetensors"), {"pad": mx.ones((3,)), "a": a})
    info = read_header(tmp_path / "t.safetensors")["a"]
    pieces = (Piece(1, 3, 4), Piece(7, 10, 3), Piece(10, 10, 2))  # padded, whole, all padding
    for axis, cut in ((-1, pieces), (-2, pieces[:1])):
        ours = read_tensor(info, axis, cut)
        assert ours.dtype == dtype
        np.testing.assert_array_equal(np.array(ours.astype(mx.float32)), np.array(cut_array(a, axis, cut).astype(mx.float32)))
    np.testing.assert_array_equal(np.array(read_tensor(info).astype(mx.float32)), np.array(a.astype(mx.float32)))
