"""Pinned positions through the generation loop, infill and edits on a tiny model, `check`
against the transformers reference, bad inputs, and the `infill` / `check` commands."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from typer.testing import CliRunner

from mlx_diffusiongemma import UserError, generate_step, load
from mlx_diffusiongemma import cli
from mlx_diffusiongemma.chat import ChatSession
from mlx_diffusiongemma.demos.sudoku import puzzles as sudoku
from mlx_diffusiongemma.demos.sudoku.solver import given_pins
from mlx_diffusiongemma.demos.sudoku.tokenizer import build_tokenizer
from mlx_diffusiongemma.generate import GenerationSettings
from mlx_diffusiongemma.infill import check, edit, infill, split_holes
from reference import make_reference

CANVAS = 8
FAST = dict(max_denoising_steps=3, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference, model, tokenizer, path): a random model with a Gemma-4-style tokenizer."""
    path = tmp_path_factory.mktemp("infill")
    ref = make_reference(path, seed=4, canvas_length=CANVAS, shard="50MB", vocab_size=512, sliding_window=16)
    build_tokenizer(path, vocab_size=512)
    model, tokenizer = load(path)
    return ref, model, tokenizer, path


def committed_tokens(events) -> list[int]:
    return [t for e in events if e.committed is not None for t in e.committed]


# --- pinned positions in the generation loop -------------------------------------------


def test_pinned_tokens_are_committed_at_their_positions_across_canvases(tiny):
    _, model, _, _ = tiny
    pinned = {0: 300, 5: 301, 8: 302, 15: 303, 17: 304, 23: 305}
    events = list(generate_step(model, [2, 10, 11], max_tokens=24, pinned=pinned, eos_token_ids=[], **FAST))
    out = committed_tokens(events)
    assert len(out) == 24 and all(out[p] == t for p, t in pinned.items())
    # Every step's draft already holds the pinned tokens of its canvas.
    for e in events:
        if e.committed is None:
            draft = e.argmax.tolist()
            assert all(draft[p - CANVAS * e.canvas] == t for p, t in pinned.items() if p // CANVAS == e.canvas)


def test_pinned_steps_have_finite_entropy_and_no_early_eos(tiny):
    _, model, _, _ = tiny
    free = committed_tokens(generate_step(model, [2, 10, 11], max_tokens=24, eos_token_ids=[], **FAST))
    eos = free[1]  # a token the model writes early on its own
    events = list(generate_step(model, [2, 10, 11], max_tokens=24, pinned={20: 300}, eos_token_ids=[eos], **FAST))
    out = committed_tokens(events)
    assert all(math.isfinite(e.mean_entropy) for e in events if e.committed is None)
    assert eos not in out[:20] and out[20] == 300


def test_fully_pinned_canvas_is_committed_without_a_forward(tiny, monkeypatch):
    _, model, _, _ = tiny
    calls = []
    original = model.denoise
    monkeypatch.setattr(model, "denoise", lambda *a, **k: calls.append(1) or original(*a, **k))
    pinned = {p: 300 + p for p in range(CANVAS, 2 * CANVAS)}
    events = list(generate_step(model, [2, 10], max_tokens=2 * CANVAS, pinned=pinned, eos_token_ids=[], **FAST))
    second = [e for e in events if e.canvas == 1]
    assert committed_tokens(events)[CANVAS:] == [300 + p for p in range(CANVAS, 2 * CANVAS)]
    assert [e.step for e in second if e.committed is None] == [0]
    assert len(calls) == sum(1 for e in events if e.committed is None and e.canvas == 0)


@pytest.mark.parametrize("speed", [dict(fast=True), dict(sampler="confidence", threshold=0.5),
                                   dict(self_conditioning_top_k=4)])
def test_pins_hold_in_the_fast_mode_and_its_levers(tiny, speed):
    _, model, _, _ = tiny
    pinned = {0: 300, 5: 301, 9: 302, 15: 303}
    events = list(generate_step(model, [2, 10, 11], max_tokens=16, pinned=pinned, eos_token_ids=[], seed=1, **speed))
    out = committed_tokens(events)
    assert len(out) == 16 and all(out[p] == t for p, t in pinned.items())
    for e in events:  # every draft holds the pins of its canvas
        if e.committed is None:
            draft = e.argmax.tolist()
            assert all(draft[p - CANVAS * e.canvas] == t for p, t in pinned.items() if p // CANVAS == e.canvas)


def test_pins_hold_over_an_initial_canvas(tiny):
    _, model, _, _ = tiny
    pinned = {2: 300, 6: 301}
    events = generate_step(model, [2, 10], max_tokens=CANVAS, initial_canvas=[5] * CANVAS, pinned=pinned,
                           eos_token_ids=[], **FAST)
    out = committed_tokens(events)
    assert (out[2], out[6]) == (300, 301)


@pytest.mark.parametrize("speed", [dict(), dict(sampler="confidence", threshold=0.5)])
def test_first_forward_reads_the_starting_canvas_and_later_ones_the_pins(tiny, monkeypatch, speed):
    _, model, _, _ = tiny
    seen = []
    original = model.denoise
    monkeypatch.setattr(model, "denoise",
                        lambda canvas, *a, **k: seen.append(canvas.tolist()[0]) or original(canvas, *a, **k))
    pinned = {2: 300, 6: 301, 9: 302}
    events = list(generate_step(model, [2, 10], max_tokens=2 * CANVAS, initial_canvas=[5] * CANVAS, pinned=pinned,
                                eos_token_ids=[], stability_threshold=0, confidence_threshold=1e-12, **FAST, **speed))
    steps = [e.canvas for e in events if e.committed is None]
    assert len(seen) == len(steps) and steps.count(0) > 1 and steps.count(1) > 1
    for i, (canvas, c) in enumerate(zip(seen, steps)):
        first = i == 0 or steps[i - 1] != c
        pins = {p - CANVAS * c: t for p, t in pinned.items() if p // CANVAS == c}
        assert all((canvas[p] == 5) if first else (canvas[p] == t) for p, t in pins.items())


def test_batch_rows_have_their_own_pins(tiny):
    _, model, _, _ = tiny
    rows = [{1: 300, 9: 301}, {2: 302}]
    events = list(generate_step(model, [[2, 10], [2, 11]], max_tokens=16, pinned=rows, eos_token_ids=[], **FAST))
    a = [t for e in events if e.committed is not None for t in e.committed[0]]
    b = [t for e in events if e.committed is not None for t in e.committed[1]]
    assert (a[1], a[9], b[2]) == (300, 301, 302)


def test_pinned_tokens_are_committed_in_every_chat_turn(tiny):
    _, model, tokenizer, _ = tiny
    pinned = {0: 400, 3: 401, 9: 402}
    session = ChatSession(model, tokenizer, max_tokens=16, pinned=pinned, eos_token_ids=[], **FAST)
    for message in ("hello there", "and again"):
        responses = list(session.reply(message))
        out = [t for r in responses if r.committed is not None for t in r.committed]
        assert all(out[p] == t for p, t in pinned.items())
    assert session.last_turn.reused_tokens > 0  # the second turn ran on the reused cache


# --- infill and edit ---------------------------------------------------------------------


def assert_around(result, segments):
    """`result.text` is segments[0] + fill + segments[1] + fill + ... with the segments exact."""
    rest = result.text
    assert rest.startswith(segments[0])
    rest = rest[len(segments[0]):]
    for fill, segment in zip(result.fills, segments[1:]):
        assert rest.startswith(fill + segment)
        rest = rest[len(fill + segment):]
    assert rest == ""


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_infill_returns_the_text_around_each_hole_byte_for_byte(tiny, chat):
    _, model, tokenizer, _ = tiny
    text = "def f(x):\n  <fill>3</fill> x + 1\n# the  end, with ünïcode<fill>5</fill>\n  tail"
    segments, _ = split_holes(text)
    result = infill(model, tokenizer, text, chat=chat, **FAST)
    assert_around(result, segments)
    assert result.lengths == (3, 5)
    # The committed tokens at the pinned positions are exactly the segments' tokens.
    between = tokenizer.encode(segments[1], add_special_tokens=False)
    assert result.tokens[3 : 3 + len(between)] == between
    after = tokenizer.encode(segments[2], add_special_tokens=False)
    assert result.tokens[-len(after):] == after


def test_infill_chooses_the_best_scoring_length(tiny):
    _, model, tokenizer, _ = tiny
    result = infill(model, tokenizer, "The cat <fill></fill> on the mat.", candidates=(1, 2, 4), **FAST)
    assert set(result.tried) == {(1,), (2,), (4,)}
    assert result.lengths == min(result.tried, key=result.tried.get)
    assert result.text.startswith("The cat ") and result.text.endswith(" on the mat.")


def test_lengths_argument_overrides_the_markers(tiny):
    _, model, tokenizer, _ = tiny
    result = infill(model, tokenizer, "a <fill>9</fill> b <fill></fill> c", lengths=[2, 3], **FAST)
    assert result.lengths == (2, 3) and len(result.tried) == 1


@pytest.mark.parametrize("instruction", [None, "Make it shorter."])
def test_edit_rewrites_only_the_span(tiny, instruction):
    _, model, tokenizer, _ = tiny
    text = "one two three four five"
    result = edit(model, tokenizer, text, 4, 13, instruction=instruction, **FAST)
    assert result.text.startswith("one ") and result.text.endswith(" four five")
    assert result.text == "one " + result.fills[0] + " four five"


# --- check against the reference ----------------------------------------------------------


def reference_surprise(ref, prefix: list[int], tokens: list[int]) -> np.ndarray:
    """-log softmax of the reference decoder, one forward per block, earlier blocks encoded."""
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    out = []
    with torch.no_grad():
        ref.model.encoder(input_ids=torch.tensor([prefix]), past_key_values=cache)
        for start in range(0, len(tokens), CANVAS):
            block = tokens[start : start + CANVAS]
            canvas = torch.tensor([block + [0] * (CANVAS - len(block))])
            logits = ref(past_key_values=cache, decoder_input_ids=canvas).logits[0, : len(block)].float()
            logp = torch.log_softmax(logits, dim=-1)
            out += (-logp[torch.arange(len(block)), torch.tensor(block)]).tolist()
            if start + CANVAS < len(tokens):
                n = cache.get_seq_length()
                ref.model.encoder(input_ids=canvas, past_key_values=cache,
                                  position_ids=torch.arange(n, n + CANVAS)[None])
    return np.array(out)


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_check_scores_equal_the_reference_decoder(tiny, chat):
    ref, model, tokenizer, _ = tiny
    text = "The quick brown fox jumps over the lazy dog, twice."
    result = check(model, tokenizer, text, prompt="Write a pangram." if chat else None, chat=chat)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert [t.token for t in result.tokens] == ids and len(ids) > 2 * CANVAS
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Write a pangram."}],
                                                 add_generation_prompt=True, tokenize=False, enable_thinking=False)
        prefix, end = tokenizer.encode(rendered, add_special_tokens=False), 106
    else:
        prefix, end = [tokenizer.bos_token_id], tokenizer.eos_token_id
    theirs = reference_surprise(ref, prefix, ids + [end])[: len(ids)]
    ours = np.array([t.surprise for t in result.tokens])
    assert np.abs(ours - theirs).max() < 1e-4
    assert "".join(t.piece for t in result.tokens) == text
    assert result.unlikeliest(3)[0].surprise == ours.max()


def test_check_flags_a_wrong_digit_on_the_sudoku_model():
    from mlx_diffusiongemma.demos.sudoku.solver import load_solver

    model, tokenizer = load_solver()
    puzzle, solution = sudoku.make_dataset(seed=99, n=1, blanks=30)[0]
    wrong = solution[:5] + ("1" if solution[5] != "1" else "2") + solution[6:]
    result = check(model, tokenizer, sudoku.format_grid(wrong), prompt=sudoku.format_grid(puzzle), chat=True)
    assert result.unlikeliest(1)[0].index == 5  # cell (0, 5) is character 5


def test_given_pins_are_the_answer_positions_of_the_givens():
    from mlx_diffusiongemma.demos.sudoku.solver import load_solver

    _, tokenizer = load_solver()
    puzzle, solution = sudoku.make_dataset(seed=3, n=1, blanks=40)[0]
    ids = tokenizer.encode(sudoku.format_grid(solution), add_special_tokens=False)
    pins = given_pins(tokenizer, puzzle)
    assert len(pins) == 41 and all(ids[p] == t for p, t in pins.items())


def test_live_grid_draws_pinned_givens_from_the_first_step():
    from mlx_diffusiongemma.demos.sudoku.solver import render_grid

    puzzle, _ = sudoku.make_dataset(seed=3, n=1, blanks=40)[0]
    draft = "?" * 81  # the first step's draft, before any digit is readable
    given = next(i for i, ch in enumerate(puzzle) if ch != ".")
    assert render_grid(puzzle, draft, pinned=True).plain.count(puzzle[given]) >= 1
    assert sum(ch.isdigit() for ch in render_grid(puzzle, draft, pinned=True).plain) == 41
    assert sum(ch.isdigit() for ch in render_grid(puzzle, draft).plain) == 0


def test_pinned_solve_keeps_the_givens():
    from mlx_diffusiongemma.demos.sudoku.solver import load_solver, solve_puzzle

    model, tokenizer = load_solver()
    puzzle, solution = sudoku.make_dataset(seed=11, n=1, blanks=40)[0]
    answer = solve_puzzle(puzzle, model, tokenizer, pin_givens=True, seed=0)
    assert answer is not None and all(a == g for a, g in zip(answer, puzzle) if g != ".")


def test_repair_pins_free_the_conflicting_and_doubtful_blanks():
    from mlx_diffusiongemma.demos.sudoku.solver import conflicts, load_solver, repair_pins

    model, tokenizer = load_solver()
    puzzle, solution = sudoku.make_dataset(seed=3, n=1, blanks=40)[0]
    blank = next(i for i, ch in enumerate(puzzle) if ch == "." and solution[i] != "9")
    wrong = solution[:blank] + "9" + solution[blank + 1:]
    pins = repair_pins(model, tokenizer, puzzle, wrong, extra=3)
    freed = {i for i in range(81) if (i // 9) * 10 + i % 9 not in pins}
    assert blank in freed and conflicts(wrong) & set(range(81)) - freed <= {i for i, ch in enumerate(puzzle) if ch != "."}
    assert all((i // 9) * 10 + i % 9 in pins for i, ch in enumerate(puzzle) if ch != ".")
    assert len(freed) <= len(conflicts(wrong)) + 3


# --- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, fragment", [
    ("a <fill> b", "never closed"),
    ("a </fill> b", "without an opening"),
    ("a </fill> <fill> b", "before its opening"),
    ("a <fill> <fill></fill> b", "inside another hole"),
    ("no hole here", "has no hole"),
    ("a <fill>x</fill>", "token count"),
    ("a <fill>0</fill>", "token count"),
    ("   ", "empty"),
])
def test_bad_hole_markup_is_a_one_line_error(tiny, text, fragment):
    _, model, tokenizer, _ = tiny
    with pytest.raises(UserError, match=fragment) as e:
        infill(model, tokenizer, text, **FAST)
    assert "\n" not in str(e.value)


def one_line_error(fn, fragment):
    with pytest.raises(UserError, match=fragment) as e:
        fn()
    assert "\n" not in str(e.value)


def test_length_search_skips_candidates_too_long_for_the_context(tiny):
    _, model, tokenizer, _ = tiny
    per_word = len(tokenizer.encode("word " * 100, add_special_tokens=False)) / 100
    prefix = "word " * int((model.args.max_position_embeddings - 30) / per_word)
    n = len(tokenizer.encode(prefix, add_special_tokens=False)) + 1  # BOS
    room = model.args.max_position_embeddings - n  # whole canvases: the hole, " b" and the end token
    fits = [c for c in (2, 4, 8, 16, 32, 64) if -(-(c + 2) // CANVAS) * CANVAS <= room]
    assert 0 < len(fits) < 6, "the prefix should leave room for some candidates only"
    r = infill(model, tokenizer, prefix + "<fill></fill> b", **FAST)
    assert r.lengths[0] in fits and r.text.startswith(prefix) and r.text.endswith(" b")


def test_other_bad_inputs_are_one_line_errors(tiny):
    _, model, tokenizer, _ = tiny
    one_line_error(lambda: infill(model, tokenizer, "a <fill>5000</fill> b"), "context of 4096")
    one_line_error(lambda: infill(model, tokenizer, "a <fill></fill> b", lengths=[1, 2]), "2 hole lengths")
    one_line_error(lambda: infill(model, tokenizer, "a <fill></fill> b", max_tokens=5), "sets max_tokens")
    one_line_error(lambda: infill(model, tokenizer, "a [[ b", hole=("[[", "]]")), "never closed")
    one_line_error(lambda: next(generate_step(model, [2, 5], pinned={3: 512})), "outside the model's vocabulary")
    one_line_error(lambda: next(generate_step(model, [2, 5], max_tokens=8, pinned={8: 5})), "beyond max_tokens")
    one_line_error(lambda: next(generate_step(model, [2, 5], pinned={-1: 5})), "positions >= 0")
    one_line_error(lambda: next(generate_step(model, [2, 5], pinned=[(1, 5), (1, 6)])), "twice")
    one_line_error(lambda: next(generate_step(model, [[2, 5], [2, 6]], pinned=[{1: 5}] * 3)), "3 rows")
    one_line_error(lambda: check(model, tokenizer, ""), "empty")
    one_line_error(lambda: check(model, tokenizer, "word " * 5000), "context of 4096")
    one_line_error(lambda: check(model, tokenizer, "some text", chat=True), "needs the user turn")
    one_line_error(lambda: edit(model, tokenizer, "", 0, 0), "empty")
    one_line_error(lambda: edit(model, tokenizer, "abc", 2, 1), "0 <= start <= end")
    one_line_error(lambda: GenerationSettings.resolve(model, pinned="abc"), "pinned")


# --- the command line ---------------------------------------------------------------------


def invoke(args, input=None):
    return CliRunner().invoke(cli.app, args, input=input)


def assert_one_line_error(result, fragment):
    assert result.exit_code not in (0, None)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_cli_infill_prints_the_filled_text(tiny, tmp_path):
    _, _, _, path = tiny
    file = tmp_path / "holes.txt"
    file.write_text("first <fill>2</fill> middle <fill>3</fill> last\n", encoding="utf-8")
    result = invoke(["infill", str(file), "-m", str(path), "--steps", "3", "--seed", "0"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("first ") and " middle " in out and out.endswith(" last\n")
    assert "hole lengths 2, 3" in result.stderr


def test_cli_infill_json_from_stdin_with_length(tiny):
    _, _, _, path = tiny
    result = invoke(["infill", "-", "-m", str(path), "--length", "2", "--steps", "3", "--json"],
                    input="a <fill></fill> b")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["lengths"] == [2] and report["text"] == "a " + report["fills"][0] + " b"


def test_cli_infill_errors_are_one_line(tiny, tmp_path):
    _, _, _, path = tiny
    assert_one_line_error(invoke(["infill", "-", "-m", str(path)], input="a <fill> b"), "never closed")
    assert_one_line_error(invoke(["infill", "-", "-m", str(path)], input="  \n"), "empty")
    assert_one_line_error(invoke(["infill", str(tmp_path / "missing.txt"), "-m", str(path)]), "not a file")
    assert_one_line_error(invoke(["infill", "-", "-m", str(path), "--length", "5000"], input="a <fill></fill>"),
                          "context")


def test_cli_check_lists_and_json(tiny, tmp_path):
    _, _, _, path = tiny
    file = tmp_path / "text.txt"
    file.write_text("The quick brown fox jumps.", encoding="utf-8")
    result = invoke(["check", str(file), "-m", str(path), "--top", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("1. ") and "nats" in lines[0]
    report = json.loads(invoke(["check", str(file), "-m", str(path), "--json", "--top", "2"]).stdout)
    assert "".join(t["text"] for t in report["tokens"]) == "The quick brown fox jumps."
    assert len(report["unlikeliest"]) == 2 and all(t["surprise"] >= 0 for t in report["tokens"])


def test_cli_check_errors_are_one_line(tiny):
    _, _, _, path = tiny
    assert_one_line_error(invoke(["check", "-", "-m", str(path)], input=""), "empty")
    assert_one_line_error(invoke(["check", "-", "-m", str(path), "--chat"], input="text"), "user turn")
