"""Small tokenizers that follow Gemma 4's conventions.

The real model uses Gemma 4's 262,144-token vocabulary. Tests and the small demo
model use a vocabulary of a few hundred ids built here instead, with the Gemma 4
special tokens at the same ids and a chat template with the same prompt grammar:

    <bos><|turn>system\\n<|think|>\\n{system}<turn|>\\n       (only when needed)
    <|turn>user\\n{text}<turn|>\\n
    <|turn>model\\n{answer, thoughts stripped}<turn|>\\n
    <|turn>model\\n<|channel>thought\\n<channel|>            (thinking off)
    <|turn>model\\n                                         (thinking on)

The text pipeline mirrors Gemma's: spaces become "▁", BPE with byte fallback, and a
decoder that turns "▁" back into spaces. As in Gemma, a literal "▁" in the input
therefore decodes as a space; every other string round-trips exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

GEMMA4_SPECIAL_TOKENS: dict[int, str] = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
GEMMA4_SPECIAL_IDS: dict[str, int] = {tok: i for i, tok in GEMMA4_SPECIAL_TOKENS.items()}

PAD_ID = GEMMA4_SPECIAL_IDS["<pad>"]
EOS_ID = GEMMA4_SPECIAL_IDS["<eos>"]
BOS_ID = GEMMA4_SPECIAL_IDS["<bos>"]
UNK_ID = GEMMA4_SPECIAL_IDS["<unk>"]
MASK_ID = GEMMA4_SPECIAL_IDS["<mask>"]
TURN_END_ID = GEMMA4_SPECIAL_IDS["<turn|>"]

SPACE_PIECE = "\u2581"

# Attribute names Gemma 4's tokenizer_config.json gives its marker tokens; mlx-vlm
# and transformers' Gemma 4 processors look them up by these names.
_MARKER_FIELDS: dict[str, str] = {
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}

CHAT_TEMPLATE = """\
{#- Gemma 4 prompt grammar for text-only chats (no tools, no media). -#}
{%- macro plain_text(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] != 'text' -%}
                {{- raise_exception('Only text content is supported, got: ' ~ part['type']) -}}
            {%- endif -%}
            {{- part['text'] | trim -}}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{#- Thoughts are scratch work: history keeps only what follows each <channel|>. -#}
{%- macro without_thoughts(text) -%}
    {%- set kept = namespace(text='') -%}
    {%- for piece in text.split('<channel|>') -%}
        {%- set kept.text = kept.text ~ piece.split('<|channel>')[0] -%}
    {%- endfor -%}
    {{- kept.text | trim -}}
{%- endmacro -%}
{%- if tools -%}
    {{- raise_exception('This chat template does not render tools.') -}}
{%- endif -%}
{%- set thinking = enable_thinking | default(false) -%}
{%- set has_system = messages | length > 0 and messages[0]['role'] in ['system', 'developer'] -%}
{{- bos_token -}}
{%- if thinking or has_system -%}
    {{- '<|turn>system\\n' -}}
    {%- if thinking -%}
        {{- '<|think|>\\n' -}}
    {%- endif -%}
    {%- if has_system -%}
        {{- plain_text(messages[0]['content']) -}}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in messages[1 if has_system else 0:] -%}
    {%- if message['role'] == 'user' -%}
        {{- '<|turn>user\\n' ~ plain_text(message['content']) ~ '<turn|>\\n' -}}
    {%- elif message['role'] in ['assistant', 'model'] -%}
        {{- '<|turn>model\\n' ~ without_thoughts(plain_text(message['content'])) ~ '<turn|>\\n' -}}
    {%- else -%}
        {{- raise_exception('Unsupported message role: ' ~ message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
    {%- if not thinking -%}
        {{- '<|channel>thought\\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""


def reserved_tokens(count: int) -> list[str]:
    """Return the tokens for ids ``0..count-1``: Gemma 4 specials, else ``<unused{id}>``."""
    return [GEMMA4_SPECIAL_TOKENS.get(i, f"<unused{i}>") for i in range(count)]


def _base_pieces() -> list[str]:
    """Byte-fallback tokens, the space piece, newline and printable ASCII characters."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    ascii_chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    return byte_tokens + [SPACE_PIECE, "\n"] + ascii_chars


def _merge_chain(piece: str) -> list[tuple[str, str]]:
    """Merges that build ``piece`` left to right, one character at a time."""
    return [(piece[: k - 1], piece[k - 1]) for k in range(2, len(piece) + 1)]


def _normal_vocab(extra_tokens: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Ordered normal pieces and BPE merges for the base pieces plus ``extra_tokens``."""
    pieces = _base_pieces()
    known = set(pieces)
    merges: dict[tuple[str, str], None] = {}
    for token in extra_tokens:
        if not token:
            raise ValueError("extra_tokens must not contain empty strings")
        piece = token.replace(" ", SPACE_PIECE)
        # Every prefix must itself be a token for the merge chain to reach the piece.
        for part in list(piece) + [piece[:k] for k in range(2, len(piece) + 1)]:
            if part not in known:
                known.add(part)
                pieces.append(part)
        merges.update(dict.fromkeys(_merge_chain(piece)))
    return pieces, list(merges)


def _full_vocab(
    extra_tokens: Sequence[str], vocab_size: int | None
) -> tuple[list[str], list[tuple[str, str]]]:
    """All tokens in id order (reserved, normal, padding) and the merges."""
    reserved = reserved_tokens(max(GEMMA4_SPECIAL_TOKENS) + 1)
    clashes = sorted(t for t in set(extra_tokens) if t in reserved or t.startswith("<unused"))
    if clashes:
        raise ValueError(f"extra_tokens collide with reserved tokens: {clashes}")
    normal, merges = _normal_vocab(extra_tokens)
    tokens = reserved + normal
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(tokens)} tokens needed")
        tokens += [f"<unused{i}>" for i in range(len(tokens), vocab_size)]
    return tokens, merges


def _is_special(token_id: int, token: str) -> bool:
    """Whether a token is a control token (a Gemma special or an unused slot)."""
    return token_id in GEMMA4_SPECIAL_TOKENS or token == f"<unused{token_id}>"


def _backend(tokens: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """A ``tokenizers`` pipeline laid out like Gemma's."""
    model = BPE(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=merges,
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", SPACE_PIECE)
    # Same (inert after the normalizer) split that transformers' GemmaTokenizer installs,
    # so tokenizer.json and the loaded class describe one pipeline.
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = [tok for i, tok in enumerate(tokens) if _is_special(i, tok)]
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in specials])
    return backend


def tokenizer_config() -> dict[str, Any]:
    """The ``tokenizer_config.json`` contents, with Gemma 4's field names."""
    return {
        "tokenizer_class": "GemmaTokenizer",
        "backend": "tokenizers",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        # The chat template writes <bos> itself, as Gemma 4's does.
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": 131072,
        **_MARKER_FIELDS,
    }


def build_tokenizer(
    out_dir: str | Path, extra_tokens: Sequence[str] = (), vocab_size: int | None = None
) -> Path:
    """Write a small Gemma-4-style tokenizer into ``out_dir`` and return the directory.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``.
    Ids 0..106 hold the Gemma 4 special tokens at their real ids (other slots are
    ``<unused{id}>``), followed by 256 byte-fallback tokens, "▁", newline, printable
    ASCII characters and ``extra_tokens`` (spaces in them become "▁"). ``vocab_size``
    pads the vocabulary with ``<unused{id}>`` tokens; it must cover every token.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens, merges = _full_vocab(list(extra_tokens), vocab_size)
    _backend(tokens, merges).save(str(out / "tokenizer.json"))
    config_text = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    bos_token: str = "<bos>",
) -> str:
    """Render ``messages`` with ``CHAT_TEMPLATE`` without loading a tokenizer.

    Gives the same string as ``apply_chat_template(..., tokenize=False)`` on a
    tokenizer written by ``build_tokenizer``.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    template = env.from_string(CHAT_TEMPLATE)
    return template.render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        bos_token=bos_token,
    )
