"""A sweep of bad inputs a new user would try, against the installed command line (one
subprocess each, as a shell runs it) and the Python API.

A case is handled cleanly when it ends the way the table in tests/bad_inputs.md says:
for the CLI, a non-zero exit, exactly one line on stderr that starts with `error:`, no
traceback and nothing left behind (no output directory, no partial directories); for the
API, a `UserError` (one line) naming the setting. `sudoku` on a puzzle the model gets
wrong must exit 1 and say "not solved".

    python benchmarks/bad_inputs_sweep.py            # all cases, 2 at a time
    python benchmarks/bad_inputs_sweep.py --verbose  # also print each failure's output
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
FAST = ["--max-tokens", "16", "--steps", "3", "--seed", "0"]


@dataclass
class Case:
    name: str
    argv: list[str]
    stdin: str = ""
    must_not_exist: list[Path] = field(default_factory=list)
    expect: str = "error"  # "error": one error line, non-zero exit; "not solved": exit 1


def build_models(work: Path) -> dict[str, Path]:
    """The base tiny model and one broken copy per model-directory case."""
    from test_chat import tiny_chat_model

    base = tiny_chat_model(work / "base")
    short = tiny_chat_model(work / "short", max_position_embeddings=64)
    models = {"base": base, "short": short}

    def variant(name, edit):
        path = work / name
        shutil.copytree(base, path)
        edit(path)
        models[name] = path

    def write(file, text):
        return lambda p: (p / file).write_text(text)

    def edit_json(file, change):
        def edit(p):
            data = json.loads((p / file).read_text())
            change(data)
            (p / file).write_text(json.dumps(data))
        return edit

    def remove(*files):
        return lambda p: [(p / f).unlink() for f in files]

    def set_gen(**values):
        return edit_json("generation_config.json", lambda d: d.update(values))

    variant("tok_json_truncated", lambda p: (p / "tokenizer.json").write_bytes((p / "tokenizer.json").read_bytes()[:500]))
    variant("tok_json_empty", write("tokenizer.json", ""))
    variant("tok_json_list", write("tokenizer.json", "[1, 2]"))
    variant("tok_json_no_model", write("tokenizer.json", '{"version": "1.0"}'))
    variant("tok_json_binary", lambda p: (p / "tokenizer.json").write_bytes(b"\xff\xfe\x00garbage"))
    variant("tok_config_truncated", lambda p: (p / "tokenizer_config.json").write_text(
        (p / "tokenizer_config.json").read_text()[:100]))
    variant("tok_config_list", write("tokenizer_config.json", "[]"))
    variant("tok_json_bad_model", write("tokenizer.json", '{"model": {"type": "NoSuchModel"}}'))
    variant("no_tokenizer_json", remove("tokenizer.json"))
    variant("no_chat_template", remove("chat_template.jinja"))
    variant("bad_chat_template", write("chat_template.jinja", "{% for m in messages %}{{ m.content }"))
    variant("special_tokens_map_corrupt", write("special_tokens_map.json", "{not json"))
    variant("gen_t_min_string", set_gen(t_min="0.3"))
    variant("gen_t_min_zero", set_gen(t_min=0))
    variant("gen_t_min_negative", set_gen(t_min=-0.5))
    variant("gen_t_max_below_t_min", set_gen(t_min=0.5, t_max=0.2))
    variant("gen_max_new_tokens_float", set_gen(max_new_tokens=2.5))
    variant("gen_max_new_tokens_bool", set_gen(max_new_tokens=True))
    variant("gen_max_new_tokens_zero", set_gen(max_new_tokens=0))
    variant("gen_steps_negative", set_gen(max_denoising_steps=-3))
    variant("gen_entropy_string", set_gen(sampler_config={"entropy_bound": "low"}))
    variant("gen_entropy_zero", set_gen(sampler_config={"entropy_bound": 0}))
    variant("gen_sampler_config_string", set_gen(sampler_config="fast"))
    variant("gen_confidence_negative", set_gen(confidence_threshold=-1))
    variant("gen_stability_negative", set_gen(stability_threshold=-2))
    variant("gen_eos_string", set_gen(eos_token_id="<eos>"))
    variant("gen_not_json", write("generation_config.json", "{'t_min': 0.3}"))
    variant("gen_list", write("generation_config.json", "[0.3]"))
    variant("config_not_json", write("config.json", "{"))
    variant("config_model_type", edit_json("config.json", lambda d: d.update(model_type="gemma3")))
    variant("config_missing_field", edit_json("config.json", lambda d: d["text_config"].pop("hidden_size")))
    variant("config_canvas_string", edit_json("config.json", lambda d: d.update(canvas_length="8")))
    variant("config_vocab_small", edit_json("config.json", lambda d: d["text_config"].update(vocab_size=100)))
    variant("weights_truncated", lambda p: _truncate(p / "model.safetensors"))
    variant("weights_missing", remove("model.safetensors"))
    variant("weights_lfs_pointer", write("model.safetensors", "version https://git-lfs.github.com/spec/v1\n"
                                         "oid sha256:abc\nsize 123\n"))
    variant("tok_max_length_small", edit_json("tokenizer_config.json", lambda d: d.update(model_max_length=8)))
    return models


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cli_cases(models: dict[str, Path], work: Path) -> list[Case]:
    base = str(models["base"])
    gen = lambda *args, model=base: ["generate", "Hello there", "-m", str(model), *FAST, *args]  # noqa: E731
    cases = []
    # Model directories, through generate (chat where the conversation matters).
    for name, path in models.items():
        if name in ("base", "short", "tok_max_length_small"):
            continue
        # Only a seed: explicit sampling options would replace the file's bad values.
        cases.append(Case(f"model dir: {name} (generate)", ["generate", "Hello there", "-m", str(path), "--seed", "0"]))
    for name in ("tok_json_truncated", "tok_config_truncated", "no_chat_template", "bad_chat_template",
                 "gen_t_min_string"):
        cases.append(Case(f"model dir: {name} (chat)", ["chat", "-m", str(models[name]), "--seed", "0"],
                          stdin="Hi\nAgain\n"))
    cases.append(Case("model dir: missing", gen(model=work / "nope")))
    cases.append(Case("model dir: a file", gen(model=models["base"] / "config.json")))
    cases.append(Case("model dir: empty string", gen(model="")))
    cases.append(Case("model dir: not a repo id", gen(model="not a/valid id!")))
    # Settings on the command line.
    for args in (["--seed", "-1"], ["--seed", str(2**64)], ["--seed", str(2**70)], ["--seed", "abc"],
                 ["--t-max", "inf"], ["--t-max", "nan"], ["--t-min", "nan"], ["--t-min", "0"], ["--t-min", "inf"],
                 ["--t-min", "-1"], ["--entropy-bound", "inf"], ["--entropy-bound", "nan"], ["--entropy-bound", "0"],
                 ["--stop", ""], ["--max-tokens", "0"], ["--max-tokens", "-5"], ["--max-tokens", "2.5"],
                 ["--steps", "0"], ["--steps", "1e3"], ["--max-tokens", str(10**30)], ["--t-max", "0.1"],
                 ["--no-such-option"]):
        cases.append(Case(f"setting: generate {' '.join(args) or repr('')}", gen(*args)))
    cases.append(Case("setting: generate --json --seed -1", gen("--json", "--seed", "-1")))
    for args in (["--seed", "-1"], ["--t-max", "inf"], ["--stop", ""], ["--seed", str(2**64)]):
        cases.append(Case(f"setting: chat {' '.join(args)}", ["chat", "-m", base, *FAST, *args], stdin="Hi\n"))
    # Prompts.
    cases += [
        Case("prompt: empty", ["generate", "", "-m", base, *FAST]),
        Case("prompt: whitespace", ["generate", "  \n\t", "-m", base, *FAST]),
        Case("prompt: none given", ["generate", "-m", base, *FAST]),
        Case("prompt: empty stdin", ["generate", "-", "-m", base, *FAST], stdin=""),
        Case("prompt: file missing", ["generate", "--prompt-file", str(work / "missing.txt"), "-m", base, *FAST]),
        Case("prompt: file is a directory", ["generate", "--prompt-file", str(work), "-m", base, *FAST]),
        Case("prompt: argument and file", ["generate", "Hi", "--prompt-file", __file__, "-m", base, *FAST]),
        Case("prompt: longer than the context", ["generate", "word " * 40, "-m", str(models["short"]), *FAST]),
        Case("prompt: longer than the tokenizer's model_max_length",
             ["generate", "word " * 5000, "-m", str(models["tok_max_length_small"]), *FAST]),
    ]
    # Convert.
    out = work / "convert-out"
    file = work / "a-file.txt"
    file.write_text("x")
    for name in ("tok_json_truncated", "tok_json_no_model", "tok_config_truncated", "tok_config_list",
                 "bad_chat_template", "gen_t_min_string", "gen_t_min_zero", "special_tokens_map_corrupt"):
        target = work / f"convert-{name}"
        cases.append(Case(f"convert: {name}", ["convert", str(models[name]), str(target), "--no-quantize"],
                          must_not_exist=[target]))
    cases += [
        Case("convert: unwritable (read-only /proc)", ["convert", base, "/proc/mlx-out", "--no-quantize"]),
        Case("convert: under a file", ["convert", base, str(file / "out"), "--no-quantize"]),
        Case("convert: group size the experts do not fit", ["convert", base, str(out), "--q-group-size", "64"],
             must_not_exist=[out]),
        Case("convert: mixed recipe, group 32 given", ["convert", base, str(out), "--q-group-size", "32"],
             must_not_exist=[out]),
        Case("convert: q-bits 7", ["convert", base, str(out), "--q-bits", "7"], must_not_exist=[out]),
        Case("convert: unknown recipe", ["convert", base, str(out), "--recipe", "fancy"], must_not_exist=[out]),
        Case("convert: dtype float64", ["convert", base, str(out), "--dtype", "float64"], must_not_exist=[out]),
        Case("convert: output is the input", ["convert", base, base, "--no-quantize", "--overwrite"]),
        Case("convert: missing source", ["convert", str(work / "nope"), str(out)], must_not_exist=[out]),
    ]
    # Sudoku.
    wrong = "12" + "." * 79
    cases += [
        Case("sudoku: puzzle too short", ["sudoku", "--puzzle", "123"]),
        Case("sudoku: conflicting givens", ["sudoku", "--puzzle", "11" + "." * 79]),
        Case("sudoku: letters", ["sudoku", "--puzzle", "x" * 81]),
        Case("sudoku: blanks -1", ["sudoku", "--blanks", "-1"]),
        Case("sudoku: blanks 99", ["sudoku", "--blanks", "99"]),
        Case("sudoku: sampler seed -1", ["sudoku", "--sampler-seed", "-1"]),
        Case("sudoku: sampler seed 2**64", ["sudoku", "--sampler-seed", str(2**64)]),
        Case("sudoku: model without chat template", ["sudoku", "-m", str(models["no_chat_template"])]),
        Case("sudoku: model dir missing", ["sudoku", "-m", str(work / "nope")]),
        Case("sudoku: unsolved (near-empty puzzle)", ["sudoku", "--puzzle", wrong], expect="not solved"),
    ]
    return cases


def run_cli(case: Case, env: dict) -> tuple[bool, str]:
    result = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma", *case.argv], input=case.stdin.encode(),
                            capture_output=True, env=env, timeout=600)
    stderr = result.stderr.decode("utf-8", "replace")
    stdout = result.stdout.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    left = [str(p) for p in case.must_not_exist if p.exists()]
    left += [str(p) for p in Path(case.argv[2] if len(case.argv) > 2 else "/nonexistent").parent.glob(".*partial-*")]
    if case.expect == "not solved":
        ok = result.returncode == 1 and "not solved" in stdout and "Traceback" not in stderr
    else:
        ok = (result.returncode not in (0,) and len(lines) == 1 and lines[0].startswith("error: ")
              and "Traceback" not in stderr + stdout and not left)
    shown = f"exit {result.returncode}; stderr: {stderr.strip()[-1500:]!r}" + (f"; left behind {left}" if left else "")
    return ok, shown


def api_cases(models: dict[str, Path]):
    """(name, callable, fragment the UserError must contain)."""
    from mlx_diffusiongemma import GenerationSettings, generate, generate_step, load, stream_generate
    from mlx_diffusiongemma.chat import ChatSession
    from mlx_diffusiongemma.convert import convert

    model, tok = load(models["base"])
    run = lambda **kw: generate(model, tok, "Hello", **{**dict(max_tokens=8, max_denoising_steps=2, seed=0), **kw})  # noqa: E731
    step = lambda ids, **kw: list(generate_step(model, ids, max_tokens=8, max_denoising_steps=2, **kw))  # noqa: E731
    cases = [
        ("max_tokens='10'", lambda: run(max_tokens="10"), "max_tokens"),
        ("max_tokens=True", lambda: run(max_tokens=True), "max_tokens"),
        ("max_tokens=0", lambda: run(max_tokens=0), "max_tokens"),
        ("max_tokens=2.5", lambda: run(max_tokens=2.5), "max_tokens"),
        ("t_min='0.3'", lambda: run(t_min="0.3"), "t_min"),
        ("t_min=nan", lambda: run(t_min=math.nan), "t_min"),
        ("t_max=inf", lambda: run(t_max=math.inf), "t_max"),
        ("t_max=True", lambda: run(t_max=True), "t_max"),
        ("max_denoising_steps=2.5", lambda: run(max_denoising_steps=2.5), "max_denoising_steps"),
        ("entropy_bound=-1", lambda: run(entropy_bound=-1.0), "entropy_bound"),
        ("confidence_threshold='x'", lambda: run(confidence_threshold="x"), "confidence_threshold"),
        ("stability_threshold=-1", lambda: run(stability_threshold=-1), "stability_threshold"),
        ("seed=-1", lambda: run(seed=-1), "seed"),
        ("seed=2**64", lambda: run(seed=2**64), "seed"),
        ("seed=1.5", lambda: run(seed=1.5), "seed"),
        ("seed='7'", lambda: run(seed="7"), "seed"),
        ("unknown setting temperature=0.5", lambda: run(temperature=0.5), "temperature"),
        ("prompt=None", lambda: generate(model, tok, None), "prompt"),
        ("prompt=''", lambda: generate(model, tok, ""), "prompt"),
        ("prompt=b'bytes'", lambda: generate(model, tok, b"Hello"), "prompt"),
        ("prompt=42", lambda: generate(model, tok, 42), "prompt"),
        ("prompt ids as strings", lambda: generate(model, tok, ["1", "2"]), "prompt"),
        ("prompt ids as floats", lambda: generate(model, tok, [1.0, 2.5]), "prompt"),
        ("prompt ids beyond the vocabulary", lambda: generate(model, tok, [1, 10**6]), "prompt"),
        ("prompt ids negative", lambda: generate(model, tok, [2, -1]), "prompt"),
        ("prompt ids as booleans", lambda: generate(model, tok, [True, False]), "prompt"),
        ("generate_step ids as strings", lambda: step(["a", "b"]), "prompt"),
        ("generate_step ids as floats", lambda: step([1.5, 2.0]), "prompt"),
        ("generate_step empty", lambda: step([]), "prompt"),
        ("generate_step ragged batch", lambda: step([[1, 2], [3]]), "batch"),
        ("eos_token_ids as a string", lambda: run(eos_token_ids="1"), "eos_token_ids"),
        ("eos_token_ids floats", lambda: run(eos_token_ids=[1.0]), "eos_token_ids"),
        ("initial_canvas wrong length", lambda: run(initial_canvas=[1, 2]), "initial_canvas"),
        ("pinned beyond max_tokens", lambda: run(pinned={100: 3}), "pinned"),
        ("settings= object with seed=-1",
         lambda: list(stream_generate(model, tok, "Hi", settings=GenerationSettings(seed=-1, max_tokens=8))), "seed"),
        ("settings= plus override seed=-1",
         lambda: list(stream_generate(model, tok, "Hi", settings=GenerationSettings(max_tokens=8), seed=-1)), "seed"),
        ("ChatSession(seed=-1)", lambda: ChatSession(model, tok, seed=-1), "seed"),
        ("ChatSession(stop=[''])", lambda: ChatSession(model, tok, stop=[""]), "stop"),
        ("ChatSession on a model without chat template",
         lambda: ChatSession(*load(models["no_chat_template"])), "chat template"),
        ("load(None)", lambda: load(None), "Hub id"),
        ("load(123)", lambda: load(123), "Hub id"),
        ("convert q_bits='4'", lambda: convert(models["base"], models["base"].parent / "api-out", q_bits="4"), "q_bits"),
        ("convert q_bits=4.0", lambda: convert(models["base"], models["base"].parent / "api-out", q_bits=4.0), "q_bits"),
        ("convert q_group_size=True",
         lambda: convert(models["base"], models["base"].parent / "api-out", q_group_size=True), "q_group_size"),
        ("load: corrupt tokenizer.json", lambda: load(models["tok_json_truncated"]), "tokenizer.json"),
        ("load: corrupt tokenizer_config.json", lambda: load(models["tok_config_truncated"]), "tokenizer_config.json"),
        ("load: string t_min in generation_config.json",
         lambda: run_with(load(models["gen_t_min_string"])), "generation_config.json"),
        ("load: t_min=0 in generation_config.json",
         lambda: run_with(load(models["gen_t_min_zero"])), "generation_config.json"),
    ]
    return cases


def run_with(loaded):
    from mlx_diffusiongemma import generate

    return generate(*loaded, "Hello", max_tokens=8, max_denoising_steps=2, seed=0)


def run_api(name, fn, fragment) -> tuple[bool, str]:
    from mlx_diffusiongemma import UserError

    try:
        fn()
    except UserError as e:
        message = str(e)
        ok = "\n" not in message and fragment.lower() in message.lower()
        return ok, f"UserError: {message}"
    except Exception as e:  # what the sweep is looking for: anything that is not a UserError
        return False, f"{type(e).__name__}: {e}"
    return False, "accepted (no error)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", help="run only cases whose name contains this")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "TOKENIZERS_PARALLELISM": "false"}
    try:
        models = build_models(work)
        cases = [c for c in cli_cases(models, work) if not args.only or args.only in c.name]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: (c.name, *run_cli(c, env)), cases))
        for name, fn, fragment in api_cases(models):
            if not args.only or args.only in name:
                results.append((f"api: {name}", *run_api(name, fn, fragment)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    clean = sum(ok for _, ok, _ in results)
    for name, ok, shown in results:
        if not ok or args.verbose:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {shown}")
    print(f"{clean} of {len(results)} bad inputs handled cleanly")
    return 0 if clean == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
