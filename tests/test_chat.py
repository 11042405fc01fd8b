"""ChatSession: prompts from the chat template, encoder-cache reuse across turns, and a
cache that stays consistent when a reply is cut short."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import UserError, load
from mlx_diffusiongemma.chat import ChatSession, StopStrings, repair_text
from mlx_diffusiongemma.prompt_cache import common_prefix
from mlx_diffusiongemma.demos.sudoku.tokenizer import build_tokenizer
from reference import make_reference

CANVAS = 8
WINDOW = 16
FAST = dict(max_tokens=2 * CANVAS, max_denoising_steps=3, seed=0)


def tiny_chat_model(path, **text):
    """A random model directory with a Gemma-4-style tokenizer and chat template."""
    # The tiny vision tower keeps the checkpoint at a few MB (it is not loaded).
    make_reference(path, seed=3, canvas_length=CANVAS, shard="50MB",
                   vocab_size=512, sliding_window=WINDOW, **text)
    build_tokenizer(path, vocab_size=512)
    return path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(tiny_chat_model(tmp_path_factory.mktemp("chat")))


def run(session, text):
    """Consume a reply; return its responses."""
    return list(session.reply(text))


def render(session, messages):
    return session.tokenizer.decode(session.prompt_ids(messages))


def denoise_logits(model, cache):
    canvas = mx.array(np.arange(10, 10 + CANVAS, dtype=np.int32))[None]
    return model.denoise(canvas, cache)


def fresh_logits(model, ids):
    cache = model.make_cache()
    model.encode(mx.array(ids, dtype=mx.int32)[None], cache)
    return denoise_logits(model, cache)


def assert_cache_matches(session):
    assert all(c.offset == len(session.prompt_cache.ids) for c in session.prompt_cache.cache)


USER = [{"role": "user", "content": "What is 2+2?"}]


def test_thinking_off_ends_with_an_empty_thought_block(loaded):
    text = render(ChatSession(*loaded, **FAST), USER)
    assert text == "<bos><|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def test_thinking_on_opens_with_the_think_system_turn(loaded):
    text = render(ChatSession(*loaded, thinking=True, system="Be brief.", **FAST), USER)
    assert text == "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n"


def test_earlier_thoughts_are_stripped_from_history(loaded):
    history = USER + [{"role": "assistant", "content": "<|channel>thought\nadd them<channel|>Four."},
                      {"role": "user", "content": "And 3+3?"}]
    text = render(ChatSession(*loaded, **FAST), history)
    assert "add them" not in text and "<|turn>model\nFour.<turn|>\n<|turn>user\nAnd 3+3?" in text


def counting_encoder(model, monkeypatch):
    """Record the length of every encoder pass."""
    calls = []
    original = model.encode

    def encode(ids, cache):
        calls.append(ids.shape[1])
        return original(ids, cache)

    monkeypatch.setattr(model, "encode", encode)
    return calls


def test_second_turn_encodes_only_what_follows_the_common_prefix(loaded, monkeypatch):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **FAST)
    calls = counting_encoder(model, monkeypatch)
    first = run(session, "Hello there, how are you today?")
    prompt1 = calls[0]
    canvases = [r.committed for r in first if r.committed is not None]
    answer = "".join(r.text for r in first)
    # What the cache holds: the first prompt and every committed canvas but the last.
    ids1 = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there, how are you today?"}],
                                         add_generation_prompt=True, enable_thinking=False)
    held = ids1 + [t for c in canvases[:-1] for t in c]
    messages = [{"role": "user", "content": "Hello there, how are you today?"},
                {"role": "assistant", "content": answer}, {"role": "user", "content": "Fine, thanks."}]
    ids2 = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    calls.clear()
    run(session, "Fine, thanks.")
    assert prompt1 == len(ids1) and len(ids2) > WINDOW
    assert calls[0] == len(ids2) - common_prefix(held, ids2)
    # Reuse reaches the end of the first prompt but for its empty thought block, which
    # the template leaves out of history.
    tail = tokenizer.encode("<|channel>thought\n<channel|>", add_special_tokens=False)
    assert common_prefix(held, ids2) == len(ids1) - len(tail)
    assert session.last_turn.encoded_tokens == calls[0]


def test_logits_after_reuse_equal_a_fresh_encoding(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **FAST)
    run(session, "Hello there, how are you today?")
    ids = session.prompt_ids(session.messages + [{"role": "user", "content": "Fine, thanks."}])
    start = session.prompt_cache.reuse(ids)
    assert start > WINDOW
    model.encode(mx.array(ids[start:], dtype=mx.int32)[None], session.prompt_cache.cache)
    diff = mx.abs(denoise_logits(model, session.prompt_cache.cache) - fresh_logits(model, ids)).max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("prefix", [WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW + 1])
def test_stepping_back_across_the_sliding_window_matches_fresh(loaded, prefix):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **FAST)
    rng = np.random.RandomState(prefix)
    held = rng.randint(5, 400, 3 * WINDOW).tolist()
    model.encode(mx.array(held, dtype=mx.int32)[None], session.prompt_cache.cache)
    session.prompt_cache.ids = held
    ids = held[:prefix] + rng.randint(5, 400, 7).tolist()
    assert session.prompt_cache.reuse(ids) == common_prefix(held, ids) >= prefix
    model.encode(mx.array(ids[prefix:], dtype=mx.int32)[None], session.prompt_cache.cache)
    diff = mx.abs(denoise_logits(model, session.prompt_cache.cache) - fresh_logits(model, ids)).max().item()
    assert diff < 1e-5


def test_sliding_layers_that_cannot_step_back_re_encode_from_scratch(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, keep=0, **FAST)
    run(session, "Hello there, how are you today?")
    run(session, "Fine, thanks.")
    turn = session.last_turn
    assert turn.reused_tokens == 0 and turn.encoded_tokens == turn.prompt_tokens
    ids = session.prompt_ids(session.messages + [{"role": "user", "content": "Good."}])
    start = session.prompt_cache.reuse(ids)
    model.encode(mx.array(ids[start:], dtype=mx.int32)[None], session.prompt_cache.cache)
    diff = mx.abs(denoise_logits(model, session.prompt_cache.cache) - fresh_logits(model, ids)).max().item()
    assert diff < 1e-5


def test_reply_closed_mid_canvas_keeps_history_and_a_consistent_cache(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **{**FAST, "max_tokens": 4 * CANVAS})
    replies = session.reply("Tell me a long story.")
    responses = []
    for r in replies:
        responses.append(r)
        if r.canvas == 2 and r.committed is None:
            break
    replies.close()
    committed = [r.committed for r in responses if r.committed is not None]
    assert len(committed) == 2
    ids = session.prompt_ids([{"role": "user", "content": "Tell me a long story."}])
    assert session.prompt_cache.ids == ids + committed[0] + committed[1]
    assert_cache_matches(session)
    assert session.messages[-1] == {"role": "assistant", "content": "".join(r.text for r in responses)}
    run(session, "Go on.")
    assert session.last_turn.reused_tokens > 0
    assert_cache_matches(session)


def test_reply_closed_before_any_commit_leaves_no_turn(loaded):
    session = ChatSession(*loaded, **FAST)
    replies = session.reply("Hi")
    next(replies)
    replies.close()
    assert session.messages == []
    assert session.prompt_cache.ids == session.prompt_ids([{"role": "user", "content": "Hi"}])
    assert_cache_matches(session)


def test_interrupt_inside_the_encoder_drops_the_cache(loaded, monkeypatch):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, **FAST)
    run(session, "Hello there")
    original = model.encode

    def encode_then_interrupt(ids, cache):
        original(ids[:, :1], cache)  # some layers grew, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "encode", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(session, "Again")
    monkeypatch.undo()
    assert session.prompt_cache.ids == [] and all(c.offset == 0 for c in session.prompt_cache.cache)
    run(session, "Again")
    assert session.last_turn.reused_tokens == 0
    assert_cache_matches(session)


def test_context_overflow_is_a_user_error_and_changes_nothing(loaded):
    session = ChatSession(*loaded, **FAST)
    run(session, "Hello there")
    before, cached = list(session.messages), list(session.prompt_cache.ids)
    with pytest.raises(UserError, match="context"):
        run(session, "a " * 2100)  # the tiny model's context is 4096 positions
    assert session.messages == before
    assert session.prompt_cache.ids == cached[: len(session.prompt_cache.ids)]
    assert_cache_matches(session)


def test_stop_string_cuts_the_reply_and_the_history(loaded):
    model, tokenizer = loaded
    full = "".join(r.text for r in run(ChatSession(model, tokenizer, **FAST), "Hi"))
    stop = full[5:8]
    session = ChatSession(model, tokenizer, stop=[stop], **FAST)
    responses = run(session, "Hi")
    text = "".join(r.text for r in responses)
    assert text == full[: full.index(stop)]
    assert responses[-1].finish_reason == "stop"
    assert session.messages[-1]["content"] == text
    assert_cache_matches(session)


def test_empty_message_is_rejected(loaded):
    with pytest.raises(UserError, match="empty"):
        ChatSession(*loaded, **FAST).reply(" \n\t")


def test_bad_settings_are_rejected_up_front(loaded):
    with pytest.raises(UserError, match="t_max"):
        ChatSession(*loaded, t_min=0.5, t_max=0.5)


def test_stop_strings_hold_back_a_possible_start():
    stops = StopStrings(["END"])
    assert stops.feed("abc E") == ("abc ", False)
    assert stops.feed("ND more") == ("", True)
    stops = StopStrings(["END"])
    assert stops.feed("abc E") == ("abc ", False)
    assert stops.feed("x", final=True) == ("Ex", False)


def test_repair_text_replaces_undecodable_bytes():
    assert repair_text("caf\udce9 ok") == "caf\ufffd ok"
    assert repair_text("lone \ud800 surrogate") == "lone \ufffd\ufffd\ufffd surrogate"
    assert repair_text("plain") == "plain"
