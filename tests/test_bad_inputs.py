"""Every bad input ends in one clean line (issue 12): through the command line (a non-zero
exit, exactly one `error:` line, no traceback, nothing left behind) and through the Python
API (a one-line `UserError` naming the setting). tests/bad_inputs.md lists what the user
sees for each case."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_diffusiongemma import GenerationSettings, UserError, generate, generate_step, load, stream_generate
from mlx_diffusiongemma.chat import ChatSession
from mlx_diffusiongemma.cli import app
from test_chat import tiny_chat_model

FAST = ["--max-tokens", "16", "--steps", "3", "--seed", "0"]
API_FAST = dict(max_tokens=8, max_denoising_steps=2, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(model_dir)


def invoke(args, input=""):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def one_error_line(result, *fragments, absent=()) -> str:
    """The single `error:` line of a failed command, checked for `fragments`."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    for fragment in absent:
        assert fragment not in lines[0], lines[0]
    return lines[0]


def broken(model_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny model with `edit(path)` applied."""
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    edit(path)
    return path


def write(name: str, text: str):
    return lambda p: (p / name).write_text(text)


def set_generation(**values):
    def edit(p):
        config = json.loads((p / "generation_config.json").read_text())
        (p / "generation_config.json").write_text(json.dumps({**config, **values}))
    return edit


def nothing_left(parent: Path, out: Path) -> bool:
    return not out.exists() and not list(parent.glob(f".{out.name}.*"))


# --- Tokenizer files -------------------------------------------------------------------

CORRUPT_TOKENIZER = [
    ("tokenizer.json", lambda p: (p / "tokenizer.json").write_bytes((p / "tokenizer.json").read_bytes()[:300])),
    ("tokenizer.json", write("tokenizer.json", "")),
    ("tokenizer.json", write("tokenizer.json", '{"version": "1.0"}')),
    ("tokenizer.json", lambda p: (p / "tokenizer.json").write_bytes(b"\xff\xfe\x00")),
    ("tokenizer_config.json", write("tokenizer_config.json", '{"bos_token": "<bos>", ')),
    ("tokenizer_config.json", write("tokenizer_config.json", "[]")),
    ("special_tokens_map.json", write("special_tokens_map.json", "{oops")),
]


@pytest.mark.parametrize("name,edit", CORRUPT_TOKENIZER)
def test_corrupt_tokenizer_file_is_named_at_load(model_dir, tmp_path, name, edit):
    path = broken(model_dir, tmp_path, edit)
    one_error_line(invoke(["generate", "Hi", "-m", path, *FAST]), name)
    with pytest.raises(UserError, match=name) as e:
        load(path)
    assert "\n" not in str(e.value)


def test_tokenizer_that_the_tokenizers_library_cannot_build_is_one_line(model_dir, tmp_path):
    path = broken(model_dir, tmp_path, write("tokenizer.json", '{"model": {"type": "NoSuchModel"}}'))
    one_error_line(invoke(["generate", "Hi", "-m", path, *FAST]), "cannot load the tokenizer", "tokenizer.json")


@pytest.mark.parametrize("name,edit", CORRUPT_TOKENIZER[::2])
def test_convert_checks_the_tokenizer_files_before_writing(model_dir, tmp_path, name, edit):
    path = broken(model_dir, tmp_path, edit)
    out = tmp_path / "out"
    one_error_line(invoke(["convert", path, out, "--no-quantize"]), name)
    assert nothing_left(tmp_path, out)


def test_convert_refuses_a_chat_template_that_cannot_render(model_dir, tmp_path):
    path = broken(model_dir, tmp_path, write("chat_template.jinja", "{% for m in messages %}{{ m.content }"))
    out = tmp_path / "out"
    one_error_line(invoke(["convert", path, out, "--no-quantize"]), "chat_template.jinja")
    assert nothing_left(tmp_path, out)


@pytest.mark.parametrize("values", [dict(t_min="0.3"), dict(t_min=0)])
def test_convert_refuses_a_bad_generation_config_before_writing(model_dir, tmp_path, values):
    path = broken(model_dir, tmp_path, set_generation(**values))
    out = tmp_path / "out"
    one_error_line(invoke(["convert", path, out, "--no-quantize"]), "generation_config.json")
    assert nothing_left(tmp_path, out)


# --- A model without a chat template ---------------------------------------------------

@pytest.fixture(scope="module")
def no_template(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(model_dir, path)
    (path / "chat_template.jinja").unlink()
    return path


def test_generate_without_chat_template_says_what_to_add(no_template):
    line = one_error_line(invoke(["generate", "Hi", "-m", no_template, *FAST]), "no chat template", "chat_template.jinja")
    assert line.endswith(")")  # the whole message, not one cut mid-word


def test_chat_without_chat_template_fails_at_start(no_template):
    result = invoke(["chat", "-m", no_template, *FAST], input="Hi\nAgain\n")
    one_error_line(result, "no chat template")
    assert result.exit_code == 1


def test_sudoku_on_a_model_without_chat_template_is_one_line(no_template):
    one_error_line(invoke(["sudoku", "-m", no_template, "--blanks", "30", "--seed", "1"]), "no chat template")


def test_raw_prompts_still_work_without_chat_template(no_template):
    model, tokenizer = load(no_template)
    assert isinstance(generate(model, tokenizer, "Hello there", **API_FAST), str)
    with pytest.raises(UserError, match="chat_template.jinja"):
        ChatSession(model, tokenizer)


# --- generation_config.json ------------------------------------------------------------

@pytest.mark.parametrize("values,field", [
    (dict(t_min="0.3"), "'t_min'"),
    (dict(max_new_tokens=2.5), "'max_new_tokens'"),
    (dict(max_new_tokens=True), "'max_new_tokens'"),
    (dict(sampler_config={"entropy_bound": "low"}), "sampler_config.entropy_bound"),
    (dict(sampler_config="fast"), "sampler_config"),
    (dict(eos_token_id="<eos>"), "eos_token_id"),
    (dict(eos_token_id=[10**6]), "eos_token_id"),
    (dict(t_min=0), "t_min"),
    (dict(t_min=-0.5), "t_min"),
    (dict(t_min=0.5, t_max=0.2), "t_max"),
    (dict(t_max=0.3), "t_max"),  # below the reference's t_min: no option involved, the file is named
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_denoising_steps=-3), "max_denoising_steps"),
    (dict(sampler_config={"entropy_bound": 0}), "sampler_config.entropy_bound"),
    (dict(confidence_threshold=-1), "confidence_threshold"),
    (dict(stability_threshold=-2), "stability_threshold"),
])
def test_bad_generation_config_names_the_file_not_an_option(model_dir, tmp_path, values, field):
    path = broken(model_dir, tmp_path, set_generation(**values))
    line = one_error_line(invoke(["generate", "Hi", "-m", path, "--seed", "0"]), "generation_config.json", field)
    assert "--" not in line
    with pytest.raises(UserError, match="generation_config.json"):
        generate(*load(path), "Hi", seed=0)  # no explicit setting: the file's values count


def test_option_against_a_value_from_the_file_names_both(model_dir, tmp_path):
    path = broken(model_dir, tmp_path, set_generation(t_min=0.5))
    one_error_line(invoke(["generate", "Hi", "-m", path, *FAST, "--t-max", "0.3"]),
                   "t_max", "t_min from the model's generation_config.json")


@pytest.mark.parametrize("bad", [0, "0.3"])
def test_an_option_overrides_a_bad_value_in_the_file(model_dir, tmp_path, bad):
    path = broken(model_dir, tmp_path, set_generation(t_min=bad))
    assert invoke(["generate", "Hi", "-m", path, *FAST, "--t-min", "0.3"]).exit_code == 0


# --- Settings on the command line ------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", str(2**70)], "--seed"),
    (["--t-max", "inf"], "--t-max"),
    (["--t-max", "nan"], "--t-max"),
    (["--t-min", "nan"], "--t-min"),
    (["--t-min", "inf"], "--t-min"),
    (["--t-min", "0"], "--t-min"),
    (["--entropy-bound", "inf"], "--entropy-bound"),
    (["--stop", ""], "--stop"),
])
@pytest.mark.parametrize("command", ["generate", "generate --json", "chat"])
def test_bad_option_is_refused_before_loading(command, args, fragment, tmp_path):
    # The model directory does not exist: the option must fail first.
    name, *extra = command.split()
    prompt = ["Hi"] if name == "generate" else []
    one_error_line(invoke([name, *prompt, *extra, "-m", tmp_path / "not-loaded", *args]), fragment)


def test_largest_seed_is_accepted(model_dir):
    assert invoke(["generate", "Hi", "-m", model_dir, *FAST, "--seed", str(2**64 - 1)]).exit_code == 0


def test_sudoku_sampler_seed_and_blanks_are_checked():
    one_error_line(invoke(["sudoku", "--sampler-seed", "-1"]), "--sampler-seed")
    one_error_line(invoke(["sudoku", "--blanks", "-1"]), "--blanks", absent=["fewer"])


def test_t_min_help_does_not_offer_zero():
    text = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "250"}).stdout
    rows = [line for line in text.splitlines() if "--t-min" in line or "--t-max" in line or "--entropy-bound" in line]
    assert len(rows) >= 3 and not any("x>=0" in row for row in rows)


# --- convert ---------------------------------------------------------------------------

def test_convert_to_a_place_that_cannot_be_written_says_so(model_dir):
    # /proc refuses new directories even for root, and reports 0 bytes free.
    line = one_error_line(invoke(["convert", model_dir, "/proc/mlx-out", "--no-quantize"]), "/proc",
                          absent=["disk space"])
    assert "cannot write" in line or "cannot create" in line


def test_convert_below_a_file_says_it_is_a_file(model_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    one_error_line(invoke(["convert", model_dir, tmp_path / "a-file" / "out", "--no-quantize"]), "is a file")


def test_group_size_hint_names_settings_that_work(model_dir, tmp_path):
    # The tiny model's dense MLP has 96 inputs: under the mixed recipe its group stays 64.
    out = tmp_path / "out"
    line = one_error_line(invoke(["convert", model_dir, out, "--q-group-size", "32"]), "recipe 8bit with q_group_size 32")
    assert "use q_group_size 32" not in line and nothing_left(tmp_path, out)
    assert invoke(["convert", model_dir, out, "--recipe", "8bit", "--q-group-size", "32"]).exit_code == 0


# --- The Python API --------------------------------------------------------------------

@pytest.mark.parametrize("settings,name", [
    (dict(max_tokens="10"), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(t_min="0.3"), "t_min"),
    (dict(t_min=math.nan), "t_min"),
    (dict(t_max=math.inf), "t_max"),
    (dict(max_denoising_steps=2.5), "max_denoising_steps"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
    (dict(eos_token_ids="1"), "eos_token_ids"),
    (dict(eos_token_ids=[1.0]), "eos_token_ids"),
])
def test_api_settings_of_the_wrong_type_or_range(loaded, settings, name):
    with pytest.raises(UserError, match=name) as e:
        generate(*loaded, "Hello", **{**API_FAST, **settings})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prompt", [None, "", b"Hello", 42, ["1", "2"], [1.0, 2.0], [True, False], [1, -1]])
def test_api_prompts_of_the_wrong_kind(loaded, prompt):
    with pytest.raises(UserError, match="prompt"):
        generate(*loaded, prompt, **API_FAST)


def test_api_hand_built_settings_are_validated(loaded):
    model, tokenizer = loaded
    with pytest.raises(UserError, match="seed"):
        list(stream_generate(model, tokenizer, "Hi", settings=GenerationSettings(seed=-1, max_tokens=8)))
    with pytest.raises(UserError, match="seed"):
        list(stream_generate(model, tokenizer, "Hi", settings=GenerationSettings(max_tokens=8), seed=-1))
    with pytest.raises(UserError, match="prompt"):
        next(generate_step(model, ["a", "b"], max_tokens=8))


def test_api_token_ids_from_numpy_are_accepted(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("Hello there")
    expected = generate(model, tokenizer, ids, **API_FAST)
    assert generate(model, tokenizer, np.array(ids), **{**API_FAST, "seed": np.uint64(0)}) == expected


@pytest.mark.parametrize("path", [None, 123])
def test_api_load_of_something_that_is_not_a_path(path):
    with pytest.raises(UserError, match="directory path or a Hub id"):
        load(path)


@pytest.mark.parametrize("kwargs", [dict(q_bits="4"), dict(q_bits=4.0), dict(q_group_size=True)])
def test_api_convert_settings_of_the_wrong_type(model_dir, tmp_path, kwargs):
    from mlx_diffusiongemma.convert import convert

    with pytest.raises(UserError, match="is not supported"):
        convert(model_dir, tmp_path / "out", **kwargs)
    assert nothing_left(tmp_path, tmp_path / "out")


def test_api_stop_strings(loaded):
    with pytest.raises(UserError, match="stop"):
        ChatSession(*loaded, stop=[""])
    assert ChatSession(*loaded, stop="\n\n").stop == ["\n\n"]


# --- What leaks from the libraries underneath ------------------------------------------

def test_prompt_over_the_tokenizers_length_prints_no_library_warning(model_dir, tmp_path):
    def edit(p):
        config = json.loads((p / "tokenizer_config.json").read_text())
        (p / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8}))

    path = broken(model_dir, tmp_path, edit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma", "generate", "word " * 30, "-m", str(path),
                             "--json", *FAST], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Token indices" not in result.stderr and "warning" not in result.stderr.lower()
