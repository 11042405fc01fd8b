"""The small Gemma-4-style tokenizer: ids, round trips and the chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from mlx_diffusiongemma.demos.sudoku.tokenizer import (
    GEMMA4_SPECIAL_TOKENS,
    build_tokenizer,
    render_prompt,
)

USER = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"), extra_tokens=[" the", "Sudoku"])


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return AutoTokenizer.from_pretrained(tok_dir)


def chat(tok, messages, thinking: bool | None = None) -> str:
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


def test_special_tokens_sit_at_gemma4_ids(tok) -> None:
    for token_id, token in GEMMA4_SPECIAL_TOKENS.items():
        assert tok.convert_ids_to_tokens(token_id) == token
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert (tok.unk_token_id, tok.mask_token_id) == (3, 4)
    assert tok.convert_tokens_to_ids(["<|tool_response>", "<|think|>", "<|turn>", "<turn|>"]) == [
        50,
        98,
        105,
        106,
    ]


def test_unused_slots_and_small_vocab(tok) -> None:
    assert tok.convert_ids_to_tokens(5) == "<unused5>"
    assert tok.convert_ids_to_tokens(99) == "<unused99>"
    assert 400 < len(tok) < 600


def test_no_implicit_bos(tok) -> None:
    assert tok.encode("hi")[0] != tok.bos_token_id


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces  ",
        "line one\nline two\n\n\ttabbed\r\n",
        "emoji 🎉👩‍👩‍👧 and CJK 日本語の文章 한국어",
        "\U0001d11e",
        "the Sudoku thesaurus <not special> ünïcödé",
    ],
)
def test_round_trip(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert 3 not in ids  # byte fallback means <unk> never appears


def test_extra_tokens_are_single_ids(tok) -> None:
    assert tok.convert_ids_to_tokens(tok.encode(" the Sudoku", add_special_tokens=False)) == [
        "▁the",
        "▁",
        "Sudoku",
    ]


def test_tokenizers_file_matches_transformers(tok, tok_dir: Path) -> None:
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    text = "<|turn>user\nSudoku 🎉<turn|>"
    assert raw.encode(text).ids == tok.encode(text, add_special_tokens=False)


def test_vocab_size_padding(tmp_path: Path) -> None:
    out = build_tokenizer(tmp_path, vocab_size=512)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 512 and vocab["<unused511>"] == 511
    with pytest.raises(ValueError, match="smaller"):
        build_tokenizer(tmp_path / "small", vocab_size=200)


def test_prompt_thinking_off_is_default(tok) -> None:
    expected = "<bos><|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert chat(tok, USER) == expected
    assert chat(tok, USER, thinking=False) == expected


def test_prompt_thinking_on(tok) -> None:
    assert chat(tok, USER, thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n"
    )


def test_prompt_with_system_message(tok) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, *USER]
    assert chat(tok, messages) == (
        "<bos><|turn>system\nAnswer briefly.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert chat(tok, messages, thinking=True) == (
        "<bos><|turn>system\n<|think|>\nAnswer briefly.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n"
    )


def test_history_strips_earlier_thoughts(tok) -> None:
    messages = [
        *USER,
        {"role": "assistant", "content": "<|channel>thought\nTwo plus two.<channel|>4"},
        {"role": "user", "content": "And times 3?"},
    ]
    assert chat(tok, messages, thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n"
        "<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n4<turn|>\n"
        "<|turn>user\nAnd times 3?<turn|>\n"
        "<|turn>model\n"
    )


def test_render_prompt_matches_transformers(tok) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        *USER,
        {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Four."},
        {"role": "user", "content": "Thanks"},
    ]
    for thinking in (False, True):
        assert render_prompt(messages, enable_thinking=thinking) == chat(tok, messages, thinking)


def test_unsupported_roles_fail_loudly() -> None:
    with pytest.raises(Exception, match="role"):
        render_prompt([{"role": "tool", "content": "x"}])


def test_mlx_lm_loads_it_like_gemma4(tok_dir: Path) -> None:
    from mlx_lm import tokenizer_utils  # a runtime dependency: never skipped

    wrapper = tokenizer_utils.load(tok_dir)
    assert wrapper.think_start == "<|channel>thought" and wrapper.think_end_tokens == (101,)
    assert chat(wrapper, USER, thinking=False) == render_prompt(USER)
    text = "Sudoku  grid\n日本 🎉"
    detokenizer = wrapper.detokenizer
    for token_id in wrapper.encode(text, add_special_tokens=False):
        detokenizer.add_token(token_id)
    detokenizer.finalize()
    assert detokenizer.text == text


def test_extra_tokens_cannot_shadow_reserved_names(tmp_path: Path) -> None:
    for bad in ("<turn|>", "<unused7>"):
        with pytest.raises(ValueError, match="collide"):
            build_tokenizer(tmp_path, extra_tokens=[bad])
