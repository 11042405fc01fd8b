"""The command line through Typer's runner: output modes, options, and one-line errors."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_diffusiongemma import cli
from mlx_diffusiongemma.cli.generate import _json_report
from mlx_diffusiongemma.ui.live import PlainView, printable
from mlx_diffusiongemma.ui.progress import ProgressBar
from test_chat import tiny_chat_model

FAST = ["--max-tokens", "16", "--steps", "3", "--seed", "0"]
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_chat_model(tmp_path_factory.mktemp("cli")))


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory):
    return str(tiny_chat_model(tmp_path_factory.mktemp("short"), max_position_embeddings=64))


def invoke(args, input=None):
    return CliRunner().invoke(cli.app, args, input=input)


def generate(model_dir, *args, input=None):
    return invoke(["generate", *args, "-m", model_dir, *FAST], input=input)


def assert_one_line_error(result, *fragments):
    assert result.exit_code not in (0, None)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_piped_generate_prints_only_text_and_puts_stats_on_stderr(model_dir):
    result = generate(model_dir, "Hello there")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and not CONTROL.search(result.stdout)
    assert "tokens/forward" in result.stderr and "tokens/forward" not in result.stdout


def test_json_is_one_object_with_the_same_text(model_dir):
    plain = generate(model_dir, "Hello there").stdout
    result = generate(model_dir, "Hello there", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert printable(report["text"]) + "\n" == plain
    assert report["finish_reason"] in ("stop", "length") and set(report["steps"]) == {3}
    forwards = 3 * len(report["steps"])
    assert report["decoder_forwards"] == forwards
    assert report["tokens_per_forward"] == pytest.approx(report["generation_tokens"] / forwards)


def test_json_reports_thoughts_and_tool_calls_apart_from_the_answer():
    text = ('<|channel>thought\nplan it<channel|>Sure.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}'
            '<tool_call|><|tool_call>call:noop{}<tool_call|>')
    report = json.loads(_json_report(text, None, "stop"))
    assert report["text"] == text and report["content"] == "Sure." and report["reasoning"] == "plan it"
    assert report["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
                                    {"name": "noop", "arguments": {}}]
    plain = json.loads(_json_report("Just text.", None, "stop"))
    assert (plain["content"], plain["reasoning"], plain["tool_calls"]) == ("Just text.", "", [])


@pytest.mark.parametrize("options, settings", [
    (["--sampler", "confidence", "--threshold", "0.5"], dict(sampler="confidence", threshold=0.5)),
    (["--self-conditioning-top-k", "4"], dict(self_conditioning_top_k=4)),
    (["--cut-canvas", "--min-canvas-length", "1"], dict(full_canvas=False, min_canvas_length=1)),
])
def test_speed_options_are_the_python_settings_of_the_same_names(model_dir, options, settings):
    from mlx_diffusiongemma import load
    from mlx_diffusiongemma.chat import ChatSession

    # 11 tokens: a whole canvas and 3 positions of the next, which --cut-canvas cuts.
    run = ["generate", "Hello there", "-m", model_dir, "--json", "--max-tokens", "11", "--steps", "3", "--seed", "0"]
    result = invoke([*run, *options])
    assert result.exit_code == 0, result.output
    model, tokenizer = load(model_dir)
    session = ChatSession(model, tokenizer, max_tokens=11, max_denoising_steps=3, seed=0, **settings)
    expected = "".join(r.text for r in session.reply("Hello there"))
    assert json.loads(result.stdout)["text"] == expected
    assert expected != json.loads(invoke(run).stdout)["text"]


@pytest.mark.parametrize("options, words", [
    (["--sampler", "greedy"], "'greedy' is not one of entropy, confidence"),
    (["--threshold", "1.5"], "not a probability in (0, 1]"),
    (["--threshold", "nan"], "not a probability in (0, 1]"),
    (["--min-canvas-length", "0"], "--min-canvas-length"),
])
def test_bad_speed_options_are_one_line_errors_before_loading(model_dir, options, words):
    result = invoke(["generate", "Hi", "-m", "/nonexistent/model", *options])
    assert_one_line_error(result, words)


def test_stdin_and_prompt_file_accept_bytes_that_are_not_utf8(model_dir, tmp_path):
    assert generate(model_dir, "-", input=b"caf\xe9 \xff\xfe there\n").exit_code == 0
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"caf\xe9 \xff\xfe there\n")
    assert generate(model_dir, "--prompt-file", str(prompt)).exit_code == 0


def test_argv_bytes_that_are_not_utf8_arrive_repaired(model_dir):
    # Python hands undecodable argv bytes over as lone surrogates.
    a = generate(model_dir, "caf\udce9", "--json")
    b = generate(model_dir, "caf\ufffd", "--json")
    assert a.exit_code == 0 and json.loads(a.stdout) == {**json.loads(b.stdout), **timings(a)}


def timings(result):
    return {k: v for k, v in json.loads(result.stdout).items() if k.endswith(("_tps", "memory_gb"))}


def test_stop_string_cuts_the_output(model_dir):
    full = json.loads(generate(model_dir, "Hello there", "--json").stdout)["text"]
    stop = full[4:7]
    report = json.loads(generate(model_dir, "Hello there", "--json", "--stop", stop).stdout)
    assert report["text"] == full[: full.index(stop)] and report["finish_reason"] == "stop"


def test_think_changes_the_prompt(model_dir):
    off = json.loads(generate(model_dir, "Hi", "--json").stdout)["prompt_tokens"]
    on = json.loads(generate(model_dir, "Hi", "--json", "--think").stdout)["prompt_tokens"]
    assert on != off


def test_ctrl_c_in_generate_exits_130_after_the_committed_text(model_dir, monkeypatch):
    full = json.loads(invoke(["generate", "Hi", "-m", model_dir, "--json", *FAST, "--max-tokens", "32"]).stdout)
    original = PlainView.update

    def update_then_interrupt(self, r):
        original(self, r)
        if r.text:
            raise KeyboardInterrupt

    monkeypatch.setattr(PlainView, "update", update_then_interrupt)
    result = invoke(["generate", "Hi", "-m", model_dir, *FAST, "--max-tokens", "32"])
    assert result.exit_code == 130
    text = result.stdout.rstrip("\n")
    assert text and full["text"].startswith(text)


BAD_OPTIONS = [
    (["--steps", "0"], "--steps"),
    (["--steps", "many"], "--steps"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--entropy-bound", "0"], "--entropy-bound"),
    (["--entropy-bound", "-1"], "--entropy-bound"),
    (["--t-min", "-0.1"], "--t-min"),
    (["--t-max", "0.3", "--t-min", "0.4"], "--t-max"),
    (["--t-max", "0.3"], "t_max"),  # checked against the model's t_min after loading
    (["--no-such-option"], "--no-such-option"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("args,fragment", BAD_OPTIONS)
def test_bad_option_values_are_one_line_errors(model_dir, command, args, fragment):
    prompt = ["Hi"] if command == "generate" else []
    assert_one_line_error(invoke([command, *prompt, "-m", model_dir, *args], input=""), fragment)


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_prompt_is_a_one_line_error(model_dir, prompt):
    assert_one_line_error(generate(model_dir, prompt), "empty")
    assert_one_line_error(generate(model_dir, "-", input=prompt), "empty")


def test_prompt_sources_are_checked(model_dir, tmp_path):
    assert_one_line_error(invoke(["generate", "-m", model_dir]), "no prompt")
    assert_one_line_error(generate(model_dir, "Hi", "--prompt-file", __file__), "not both")
    assert_one_line_error(generate(model_dir, "--prompt-file", str(tmp_path / "missing.txt")), "missing.txt")


def test_missing_model_directory_is_a_one_line_error(tmp_path):
    assert_one_line_error(invoke(["generate", "Hi", "-m", str(tmp_path / "nope")]), "nope")
    assert_one_line_error(invoke(["chat", "-m", "./typo-dir"], input=""), "typo-dir")


def test_prompt_longer_than_the_context_is_a_one_line_error(short_context_dir):
    result = invoke(["generate", "word " * 20, "-m", short_context_dir, *FAST])
    assert_one_line_error(result, "context of 64")


def help_text(command):
    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "250"})
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.stdout).split())


def test_help_shows_defaults():
    text = help_text("generate")
    assert "[default: (mlx-community/diffusiongemma-26B-A4B-it-4bit)]" in text
    assert "[default: (model's or 48)]" in text and "[default: (model's or 256)]" in text
    convert = help_text("convert")
    assert "[default: 4]" in convert and "[default: 64]" in convert and "[default: mixed]" in convert


def test_chat_commands_and_quit(model_dir):
    script = "Hello there\n/think on\n/system Be brief.\n/stats\n/think maybe\n/bogus\n/reset\n/stats\n/quit\nnever read\n"
    result = invoke(["chat", "-m", model_dir, *FAST], input=script)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "thinking on" in out and "system prompt set" in out and "conversation cleared" in out
    assert "tokens/forward" in out and "1 turns" in out and "no reply yet" in out
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "/think" in errors[0] and "/bogus" in errors[1]


def test_chat_end_of_input_exits_cleanly(model_dir):
    result = invoke(["chat", "-m", model_dir, *FAST], input="Hello there\nAnd again\n")
    assert result.exit_code == 0 and result.exception is None


def test_chat_survives_bytes_that_are_not_utf8(model_dir):
    result = invoke(["chat", "-m", model_dir, *FAST], input=b"caf\xe9 \xff\xfe\n/stats\n")
    assert result.exit_code == 0 and "1 turns" in result.stdout


def test_chat_reports_a_turn_too_long_and_goes_on(short_context_dir):
    result = invoke(["chat", "-m", short_context_dir, *FAST], input="word " * 20 + "\nHi\n/stats\n")
    assert result.exit_code == 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "context" in errors[0]
    assert "1 turns" in result.stdout


def test_convert_writes_a_model_that_generates(model_dir, tmp_path):
    out = tmp_path / "mlx"
    result = invoke(["convert", model_dir, str(out), "--no-quantize", "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert "converted model written to" in result.stdout
    assert generate(str(out), "Hello there").exit_code == 0


def test_convert_refuses_a_non_empty_output_unless_overwrite(model_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert_one_line_error(invoke(["convert", model_dir, str(tmp_path), "--no-quantize"]), "--overwrite")
    assert (tmp_path / "keep.txt").exists()
    assert invoke(["convert", model_dir, str(tmp_path), "--no-quantize", "--overwrite"]).exit_code == 0


def test_convert_interrupted_says_nothing_was_written(model_dir, tmp_path, monkeypatch):
    def interrupt(self, done, total):
        raise KeyboardInterrupt

    monkeypatch.setattr(ProgressBar, "__call__", interrupt)
    result = invoke(["convert", model_dir, str(tmp_path / "out"), "--no-quantize"])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert f"error: conversion interrupted; nothing was written to {tmp_path / 'out'}" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--q-bits", "7"], "q_bits"),
    (["--recipe", "fancy"], "recipe"),
    (["--dtype", "float64"], "dtype"),
    (["--q-group-size", "64"], "cannot quantize"),  # the tiny model's experts have 32 inputs
])
def test_convert_settings_are_checked(model_dir, tmp_path, args, fragment):
    assert_one_line_error(invoke(["convert", model_dir, str(tmp_path / "out"), *args]), fragment)
    assert not (tmp_path / "out").exists()


def test_convert_missing_source_is_one_line(tmp_path):
    assert_one_line_error(invoke(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]), "nope")


def test_convert_warns_in_one_line_without_tokenizer_files(model_dir, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for f in Path(model_dir).iterdir():
        if not f.name.startswith("tokenizer"):
            (source / f.name).write_bytes(f.read_bytes())
    result = invoke(["convert", str(source), str(tmp_path / "out"), "--no-quantize"])
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "tokenizer" in warnings[0]
