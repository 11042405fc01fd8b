"""Fine-tuning data as mlx-lm reads it: a folder with `train.jsonl`, `valid.jsonl` and
`test.jsonl`, one JSON object a line in one of three formats:

- chat: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`
- completions: `{"prompt": ..., "completion": ...}` (a user turn and the answer)
- text: `{"text": ...}` (no prompt: the first token conditions the rest)

Chats and completions are rendered with the model's chat template; the answer is the last
assistant turn followed by the template's end-of-turn token, which the sampler reads as
EOS. Every bad line is a one-line `UserError` naming the file and line.

A chat or completions line may add `"pinned_spans": [[start, end], ...]`, character ranges
of the answer that are given at generation time (`GenerationSettings.pinned`: a template's
fixed text, a puzzle's givens). The tokens lying wholly inside them are the example's
pinned positions, which the objective can keep clean (`ObjectiveArgs.pinned_rate`).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, first_line

SPLITS = ("train", "valid", "test")
ROLES = ("system", "developer", "user", "assistant", "model")


@dataclass
class Example:
    """Token ids of a prompt (never supervised) and its answer, EOS included."""

    prompt: list[int]
    answer: list[int]
    pinned: tuple[int, ...] = ()


def end_of_turn_id(tokenizer) -> int:
    """The EOS id the chat template writes after an assistant turn (`<turn|>` for Gemma 4),
    else the tokenizer's EOS."""
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    marker = "\u2063ANSWER\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001  (templates raise anything; fall back to the EOS)
        text = ""
    if marker in text:
        for t in tokenizer.encode(text.split(marker, 1)[1], add_special_tokens=False):
            if t in eos:
                return t
    return tokenizer.eos_token_id


class Renderer:
    """Turns one parsed line into an `Example` with the model's tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eot = end_of_turn_id(tokenizer)
        self.bos = getattr(tokenizer, "bos_token_id", None)

    def __call__(self, record: dict) -> Example:
        spans = record.get("pinned_spans")
        if "messages" in record:
            return self.chat(record["messages"], spans)
        if "prompt" in record and "completion" in record:
            return self.completion(record["prompt"], record["completion"], spans)
        if "text" in record:
            if spans is not None:
                raise ValueError("\"pinned_spans\" needs a chat or completions line (a text line has no answer)")
            return self.text(record["text"])
        raise ValueError(f"has keys {sorted(record)[:4]}; expected \"messages\" (chat), \"prompt\" and "
                         "\"completion\" (completions) or \"text\"")

    def chat(self, messages, spans=None) -> Example:
        if not isinstance(messages, list) or not messages:
            raise ValueError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a \"role\" (system, user or assistant) and a string \"content\"")
        if messages[-1]["role"] not in ("assistant", "model"):
            raise ValueError("the last message must be the assistant's answer to train on")
        if len(messages) < 2:
            raise ValueError("a chat needs a prompt before the assistant's answer")
        prompt = self.tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=False, enable_thinking=False)
        return self._example(prompt, messages[-1]["content"], spans)

    def completion(self, prompt, completion, spans=None) -> Example:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("\"prompt\" and \"completion\" must be strings")
        return self.chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], spans)

    def text(self, text) -> Example:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("\"text\" must be a non-empty string")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        if self.bos is not None:
            return Example([self.bos], ids + [eos])
        if len(ids) < 2:
            raise ValueError("\"text\" needs at least two tokens (the first one is the prompt)")
        return Example(ids[:1], ids[1:] + [eos])

    def _example(self, prompt_text: str, answer: str, spans=None) -> Example:
        if not answer.strip():
            raise ValueError("the assistant's answer is empty")
        prompt = self.tokenizer.encode(prompt_text, add_special_tokens=False)
        text = answer.strip()
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        pinned = () if spans is None else self._pinned(text, ids, check_spans(spans, len(answer)),
                                                       len(answer) - len(answer.lstrip()))
        return Example(prompt, ids + [self.eot], pinned)

    def _pinned(self, text: str, ids: list[int], spans: list[tuple[int, int]], shift: int) -> tuple[int, ...]:
        """Indices of the tokens of `text` (the answer with `shift` leading characters
        stripped) lying wholly inside one of `spans` (offsets into the unstripped answer)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        enc = None if backend is None else backend.encode(text, add_special_tokens=False)
        if enc is None or enc.ids != ids:
            raise ValueError("\"pinned_spans\" needs a fast tokenizer (tokenizer.json) that maps tokens to characters")
        ranges = [(a - shift, b - shift) for a, b in spans]
        return tuple(i for i, (a, b) in enumerate(enc.offsets) if a < b and any(s <= a and b <= e for s, e in ranges))


def check_spans(spans, length: int) -> list[tuple[int, int]]:
    """`spans` as (start, end) character ranges within an answer of `length` characters."""
    if not isinstance(spans, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) for r in spans):
        raise ValueError("\"pinned_spans\" must be a list of [start, end] character offsets of the answer")
    for a, b in spans:
        if not 0 <= a < b <= length:
            raise ValueError(f"pinned span [{a}, {b}] is not within the answer's {length} characters "
                             "(0 <= start < end <= length)")
    return [tuple(r) for r in spans]


def read_jsonl(path: Path, render) -> list[Example]:
    """Every non-blank line of `path` rendered; the first bad line is a one-line error."""
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({first_line(e)})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, found {type(record).__name__}")
        try:
            examples.append(render(record))
        except ValueError as e:
            raise UserError(f"{path}:{n}: {first_line(e)}") from None
        except Exception as e:  # noqa: BLE001  (the chat template raises its own types)
            raise UserError(f"{path}:{n}: the chat template cannot render this line ({first_line(e)})") from None
    return examples


def load_dataset(data, tokenizer, splits=SPLITS) -> dict[str, list[Example]]:
    """The `splits` of a data folder that exist (an empty list for a missing file)."""
    folder = Path(data)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist; it should hold train.jsonl, valid.jsonl, test.jsonl")
    render = Renderer(tokenizer)
    out = {}
    for split in splits:
        path = folder / f"{split}.jsonl"
        out[split] = read_jsonl(path, render) if path.is_file() else []
    return out
