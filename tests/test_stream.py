"""Committed text as streamed deltas: EOS cuts, and a character split across canvases."""

import pytest
from transformers import AutoTokenizer

from mlx_diffusiongemma.generate import CommittedText
from mlx_diffusiongemma.demos.sudoku.tokenizer import EOS_ID, TURN_END_ID, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def test_character_split_across_canvases_is_held_back(tokenizer):
    ids = tokenizer.encode("café ok", add_special_tokens=False)
    cut = ids.index(tokenizer.convert_tokens_to_ids("<0xA9>"))  # between the two bytes of é
    text = CommittedText(tokenizer, {EOS_ID}, 0)
    first = text.commit(ids[:cut], final=False)
    second = text.commit(ids[cut:], final=True)
    assert first == "caf" and second == "é ok"


def test_text_stops_at_first_eos_of_any_kind(tokenizer):
    ids = tokenizer.encode("ab", add_special_tokens=False)
    text = CommittedText(tokenizer, {EOS_ID, TURN_END_ID}, 0)
    assert text.commit(ids + [TURN_END_ID, 0, 0], final=True) == "ab"


def test_a_dangling_byte_is_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("é", add_special_tokens=False)
    text = CommittedText(tokenizer, {EOS_ID}, 0)
    assert text.commit(ids[:1], final=False) == ""
    assert text.commit([EOS_ID], final=True) == "\ufffd"
