"""An OpenAI-compatible HTTP server: `/v1/chat/completions`, `/v1/completions`,
`/v1/models` and `/health`, on FastAPI and uvicorn.

One generation runs at a time on a worker thread that owns every MLX array (MLX streams
belong to the thread that made them); requests wait in a bounded queue and a full queue
answers 503 with `Retry-After`. Streams carry one delta per committed canvas; with
`"stream_drafts": true` each denoising step's draft also arrives as an `event: draft`
server-sent event. A client that goes away cancels its generation at the next denoising
step. Encoder caches of recent prompts are kept in a bounded LRU and the longest common
prefix is reused, reported as `usage.prompt_tokens_details.cached_tokens`.

Chat output goes through `tool_parsing.OutputParser`: thoughts to `reasoning_content`
(`delta.reasoning_content` when streaming), Gemma 4 calls to `tool_calls` (finish reason
`tool_calls`), the rest to `content`; an output that ends inside its thought gets
`"thinking_unfinished": true` on its choice rather than an unexplained empty answer.

Fill-in-the-middle: `/v1/completions` with `suffix` (what Continue-style autocomplete
sends: `prompt` before the cursor, `suffix` after it) is laid out as `infill` lays out a
hole (`infill.plan_fill`): the prompt text is the prefix, the hole is exactly `max_tokens`
tokens long (the model cannot end it early; there is no length search), and the suffix's
tokens and an end token are pinned after it. `text` is what the model wrote in the hole
only, so prompt + text + suffix is the filled document; the answer ends when the hole is
written (finish reason `stop`). `usage.prompt_tokens` counts the prefix (with BOS) and the
suffix, `completion_tokens` the hole. A token-id prompt cannot take a suffix.

Images: chat messages take OpenAI's `image_url` content parts whose `url` is a `data:`
URL (base64 PNG, JPEG, ...); http(s) URLs are fetched only when the server was started
with `allow_remote_images` (bounded in size and time), and nothing else (no local paths)
is read. Each image becomes its placeholder in the chat template and its soft tokens in
the prompt (`images.py`); the prompt cache matches images by their pixels, so a follow-up
turn about the same image reuses its encoding. A model loaded text-only, or one without a
vision tower, answers a request with images with a 400.

Sampler settings (extensions on both endpoints, the `GenerationSettings` of the same
names): `max_denoising_steps`, `t_min`, `t_max`, `entropy_bound` and the speed levers
`fast`, `sampler`, `threshold`, `self_conditioning_top_k`, `full_canvas` and
`min_canvas_length`; a bad value is a 400 naming its field.

Pinned positions (an extension on both endpoints): `"pinned": {"0": 1234, "5": 99}` maps
output positions (0 = the first generated token) to token ids that the sampler holds there
(`GenerationSettings.pinned`); positions are below `max_tokens`, ids in the vocabulary,
else a 400 with `param: "pinned"`. With a suffix they are positions in the hole, and an
end-of-text id among them is refused (it would cut the suffix off).

Accepted and ignored (no meaning for this sampler): `temperature`, `top_p`, `top_k`,
`min_p`, `frequency_penalty`, `presence_penalty`, `repetition_penalty`, `user`,
`parallel_tool_calls`, `metadata`, `store`, `service_tier`. Refused with a 400 naming the
field, because dropping them would change what the client gets: `n` > 1, `logprobs`,
`top_logprobs`, `logit_bias`, `response_format` other than text, `echo`, `best_of` > 1,
and a `tool_choice` that forces a call.
"""

import asyncio
import copy
import json
import math
import queue
import re
import secrets
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .canvas import context_needed
from .chat import StopStrings, repair_text
from .errors import UserError, first_line
from .generate import (
    CommittedText,
    GenerationSettings,
    check_token_ids,
    encode_text,
    stream_generate,
)
from .images import images_after
from .infill import FillPlan, plan_fill
from .prompt_cache import PromptCache, common_prefix, reply_keep
from .ranks import (
    follow, hear, hear_images, image_message, lead, settings_from_message, settings_message, tell, tell_pixels,
)
from .tool_parsing import OutputParser, Parsed

STATIC_DIR = Path(__file__).parent / "server_static"
API_KEY_ENV = "MLX_DIFFUSIONGEMMA_API_KEY"
_OPEN_PATHS = {"/health", "/", "/favicon.ico"}
# Across ranks, how long rank 0's generation thread waits for a job before telling the
# other ranks there is none yet, so that no rank sits in one collective for long.
_IDLE_SECONDS = 1.0
# How pydantic names the member of a union in an error's location (`str`, `list[int]`,
# `function-after[...]`, a model's class name), unlike the snake_case field names.
_UNION_TAG = re.compile(r"str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z]\w*")
_THINKING_EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_overloaded",
                500: "server_error"}.get(self.status, "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------- requests

# Request fields that are `GenerationSettings` of the same name (extensions to OpenAI's).
SETTING_FIELDS = ("seed", "max_denoising_steps", "t_min", "t_max", "entropy_bound", "fast", "sampler", "threshold",
                  "self_conditioning_top_k", "full_canvas", "min_canvas_length")


class _Request(BaseModel):
    # Strict: "5" is not a number and true is not 1; unknown fields are accepted (clients
    # send many by default) and those that matter are refused in `_refuse_unsupported`.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    logit_bias: dict | None = None
    max_denoising_steps: int | None = None
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    fast: bool | None = None
    sampler: str | None = None
    threshold: float | None = None
    self_conditioning_top_k: int | None = None
    full_canvas: bool | None = None
    min_canvas_length: int | None = None
    stream_drafts: bool = False
    pinned: dict | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None
    image_url: dict | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    chat_template_kwargs: dict | None = None
    reasoning_effort: str | None = None
    response_format: dict | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def _refuse_unsupported(req: _Request) -> None:
    """400 for fields whose silent dropping would change what the client gets."""
    if req.n not in (None, 1):
        raise APIError(400, "n > 1 is not supported: this server writes one choice per request", "n")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", "logprobs")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if isinstance(req, ChatRequest):
        if req.top_logprobs:
            raise APIError(400, "top_logprobs are not supported", "top_logprobs")
        if req.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format other than {\"type\": \"text\"} is not supported", "response_format")
        if isinstance(req.tool_choice, dict) or req.tool_choice not in (None, "auto", "none"):
            raise APIError(400, "tool_choice can be \"auto\" or \"none\": forcing a call is not supported", "tool_choice")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", "best_of")


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [repair_text(s) for s in stops if s]


def _content_of(content, index: int, images: list[tuple[int, str]]) -> str | list[dict]:
    """A message's content as the template reads it: text, or (when it holds images) text
    and `{"type": "image"}` parts in order, each image's (message index, URL) appended to
    `images`."""
    if content is None or isinstance(content, str):
        return repair_text(content or "")
    parts = []
    for part in content:
        if part.type == "text" and part.text is not None:
            parts.append({"type": "text", "text": repair_text(part.text)})
        elif part.type == "image_url":
            images.append((index, _image_url_of(part, index)))
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"content parts of type {part.type!r} are not supported (text and image_url)",
                           f"messages.{index}.content")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _image_url_of(part: ContentPart, index: int) -> str:
    url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
    if not isinstance(url, str) or not url:
        raise APIError(400, "an image_url part needs {\"url\": \"data:image/png;base64,...\"}",
                       f"messages.{index}.content")
    return url


def template_messages(messages: list[Message]) -> tuple[list[dict], list[tuple[int, str]]]:
    """Messages as the chat template reads them (text or text-and-image content, tool-call
    arguments as mappings, each tool result named after the call it answers) and their
    images in order, as (message index, URL)."""
    names: dict[str, str] = {}
    out, images = [], []
    for i, m in enumerate(messages):
        item: dict[str, Any] = {"role": m.role, "content": _content_of(m.content, i, images)}
        if m.tool_calls:
            item["tool_calls"] = [_template_call(call, i, names) for call in m.tool_calls]
        if m.role == "tool":
            item["tool_call_id"] = m.tool_call_id
            item["name"] = m.name or names.get(m.tool_call_id or "", "")
        elif m.name:
            item["name"] = m.name
        out.append(item)
    return out, images


def _template_call(call: dict, index: int, names: dict[str, str]) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    param = f"messages.{index}.tool_calls"
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, "a tool call needs a function with a name", param)
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        raise APIError(400, "tool call arguments must be a JSON object", param) from None
    if not isinstance(arguments, dict):
        raise APIError(400, "tool call arguments must be a JSON object", param)
    if isinstance(call.get("id"), str):
        names[call["id"]] = function["name"]
    return {"id": call.get("id"), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def thinking_of(req: ChatRequest) -> bool:
    """The thinking switch: `chat_template_kwargs.enable_thinking`, else `reasoning_effort`."""
    kwargs = req.chat_template_kwargs or {}
    if "enable_thinking" in kwargs:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise APIError(422, "enable_thinking must be a boolean", "chat_template_kwargs.enable_thinking")
        return kwargs["enable_thinking"]
    if req.reasoning_effort is None:
        return False
    if req.reasoning_effort not in _THINKING_EFFORTS:
        raise APIError(422, f"reasoning_effort must be one of {sorted(_THINKING_EFFORTS)}", "reasoning_effort")
    return _THINKING_EFFORTS[req.reasoning_effort]


# ---------------------------------------------------------------------------- the engine

class PromptCacheLRU:
    """Encoder caches of recent prompts, bounded in entries and bytes. `take` hands out
    the one sharing the longest prefix with a prompt (a new one if none shares any); an
    entry that would have to step back is forked, so it stays for the prompts that share
    all of it (a new conversation must not destroy another's cache)."""

    def __init__(self, model, keep: int, max_entries: int = 4, max_bytes: int = 2 << 30):
        self.model, self.keep = model, keep
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[int, PromptCache] = OrderedDict()
        self._next = 0

    def take(self, ids: list[int]) -> tuple[PromptCache, int]:
        """Remove and return the best entry, stepped back to its shared prefix, and the
        number of reused tokens."""
        best, best_len = None, 0
        for key, entry in self.entries.items():
            n = common_prefix(entry.ids, ids)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            entry = PromptCache(self.model, self.keep)
        elif best_len < len(self.entries[best].ids):
            entry = self._fork(self.entries[best])
            self.entries.move_to_end(best)
        else:
            entry = self.entries.pop(best)
        return entry, entry.reuse(ids)

    def _fork(self, entry: PromptCache) -> PromptCache:
        # Cache layers replace their arrays on every update and trim (MLX arrays are
        # immutable), so a shallow copy of each layer is an independent cache.
        fork = PromptCache(self.model, self.keep)
        fork.cache, fork.ids = [copy.copy(layer) for layer in entry.cache], list(entry.ids)
        return fork

    def put(self, entry: PromptCache) -> None:
        """Keep `entry` as the most recent; evict the oldest beyond the bounds."""
        if not entry.ids:
            return
        self.entries[self._next] = entry
        self._next += 1
        while self.entries and (len(self.entries) > self.max_entries or self.nbytes > self.max_bytes):
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


@dataclass
class Job:
    """One generation: what to run and the channel its events go back through."""

    ids: list[int]
    settings: GenerationSettings
    stops: list[str]
    drafts: bool
    loop: asyncio.AbstractEventLoop | None
    fill: FillPlan | None = None
    # The prompt's images (`PreparedImage`s) and, with images, the ids as the prompt cache
    # compares them (`images.prefix_keys`).
    images: list = field(default_factory=list)
    keys: list | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    released: bool = False

    @property
    def cache_keys(self) -> list:
        """What the prompt cache compares: `keys` with images, else the ids."""
        return self.ids if self.keys is None else self.keys

    def send(self, kind: str, **payload) -> None:
        if self.loop is None:
            return  # a follower rank's copy of rank 0's job: nobody to answer
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:
            pass  # the event loop closed (shutting down): nobody is listening


class Engine:
    """The worker thread: loads the model, then runs queued jobs one at a time.

    Under `mlx.launch` the model is sharded across the ranks: rank 0's engine tells the
    others each job and leads every generation step by step (`ranks.py`), and the other
    ranks run `follow` instead of a server."""

    def __init__(self, model_path: str, cache_entries: int = 4, cache_bytes: int = 2 << 30,
                 adapter_path: str | None = None, text_only: bool = False):
        self.model_path, self.adapter_path, self.text_only = model_path, adapter_path, text_only
        self.cache_entries, self.cache_bytes = cache_entries, cache_bytes
        self.jobs: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.model = self.tokenizer = self.caches = self.group = None
        self.stats = {"generations": 0, "cancelled": 0, "errors": 0}
        self.thread = threading.Thread(target=self._main, name="generation", daemon=True)

    def start(self) -> None:
        """Start the thread and wait for the model; load errors are raised here."""
        self.thread.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def _load(self) -> None:
        from .loading import load

        adapter = {"adapter_path": self.adapter_path} if self.adapter_path else {}
        self.model, self.tokenizer = load(self.model_path, text_only=self.text_only, **adapter)
        # Sliding layers keep enough to step back over a default-length reply.
        keep = reply_keep(self.model.args, GenerationSettings.resolve(self.model).max_tokens)
        self.caches = PromptCacheLRU(self.model, keep, self.cache_entries, self.cache_bytes)
        shard = getattr(self.model, "vocab_shard", None)
        self.group = None if shard is None else shard.group

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as e:  # noqa: BLE001  (handed to the main thread)
            self.load_error = e
            self.ready.set()
            return
        self.ready.set()
        while (job := self._next_job()) is not None:
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001  (the thread must outlive any one request)
                self.stats["errors"] += 1
                job.send("error", status=500, message=first_line(e))
        if self.group is not None:
            tell(self.group, {"quit": True})

    def _next_job(self) -> "Job | None":
        if self.group is None:
            return self.jobs.get()
        while True:
            try:
                return self.jobs.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                tell(self.group, None)

    def follow(self) -> None:
        """A rank other than 0: load the model, then run each job rank 0 tells, in lockstep
        with it, until rank 0 stops."""
        self._load()
        while (message := hear(self.group)) is None or "quit" not in message:
            if message is not None:
                self._follow(message)

    def _follow(self, message: dict) -> None:
        job = Job(message["ids"], settings_from_message(message["settings"]), [], False, None,
                  images=hear_images(self.group, message["images"]), keys=message["keys"])
        entry, run, stream = self._open(job)
        try:
            for r in follow(stream, self.group):
                run.observe(r)
        except Exception:  # noqa: BLE001  (rank 0 answers the client; the caches stay alike)
            entry.clear()
            self.caches.put(entry)
            return
        entry.record(run.cached_ids())
        self.caches.put(entry)

    def _open(self, job: "Job", hole: "_HoleText | None" = None):
        """The prompt cache entry for `job`, its `_Run` and its generation's stream."""
        entry, reused = self.caches.take(job.cache_keys)
        images = images_after(job.ids, job.images, self.model.args.image_token_id, reused) if job.images else []
        stream = stream_generate(self.model, self.tokenizer, job.ids[reused:], cache=entry.cache,
                                 settings=job.settings, images=images or None)
        return entry, _Run(job, reused, hole), stream

    def stop(self) -> None:
        self.jobs.put(None)
        if self.group is not None:
            # The other ranks end on the quit message this thread sends on its way out.
            self.thread.join(timeout=60)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            job.send("done", finish_reason="cancelled", usage=None)
            return
        hole = _HoleText(self.tokenizer, job.fill, self.model.args) if job.fill else None
        if self.group is not None:
            # Nothing between telling the job and leading its stream may fail, or the
            # followers would wait for a step that never comes.
            tell(self.group, {"ids": job.ids, "keys": job.keys, "settings": settings_message(job.settings),
                              "images": [image_message(image) for image in job.images]})
            tell_pixels(self.group, job.images)
        entry, run, stream = self._open(job, hole)
        if self.group is not None:
            stream = lead(stream, self.group)
        try:
            finish = run.consume(stream)
        except Exception as e:  # noqa: BLE001  (one request's failure never stops the server)
            stream.close()
            entry.clear()
            self.caches.put(entry)
            self.stats["errors"] += 1
            status = 400 if isinstance(e, UserError) else 500
            job.send("error", status=status, message=first_line(e))
            return
        stream.close()
        entry.record(run.cached_ids())
        self.caches.put(entry)
        self.stats["cancelled" if finish == "cancelled" else "generations"] += 1
        job.send("done", finish_reason=finish, usage=run.usage())


class _Run:
    """Tracks one job's stream: deltas cut at stop strings, drafts, and what the encoder
    cache holds (the prompt and every committed canvas but the last)."""

    def __init__(self, job: Job, reused: int, hole: "_HoleText | None" = None):
        self.job, self.reused, self.hole = job, reused, hole
        self.stops = StopStrings(job.stops)
        self.canvases: list[list[int]] = []
        self.events, self.current, self.tokens = 0, 0, 0

    def observe(self, r) -> None:
        """Track what the cache holds after the event `r`."""
        self.events += 1
        self.current = r.canvas
        if r.committed is not None:
            self.canvases.append(list(r.committed))

    def consume(self, stream) -> str:
        for r in stream:
            self.observe(r)
            if self.job.cancelled.is_set():
                return "cancelled"
            if r.committed is None:
                if self.job.drafts:
                    draft = r.draft if self.hole is None else self.hole.draft(r.canvas, r.draft)
                    self.job.send("draft", canvas=r.canvas, step=r.step, text=self.stops.cut(draft))
                continue
            text, filled = self._text(r)
            delta, hit = self.stops.feed(text, final=filled or r.finish_reason is not None)
            final = hit or filled or r.finish_reason is not None
            self.job.send("delta", text=delta, final=final)
            if final:
                return "stop" if hit or filled else r.finish_reason
        return "stop"

    def _text(self, r) -> tuple[str, bool]:
        """A committed canvas's text and whether a fill's hole is now complete: the answer
        ends there, as the pinned suffix after it is the client's own text."""
        if self.hole is None:
            self.tokens = r.generation_tokens
            return r.text, False
        text, filled = self.hole.commit(r.committed)
        self.tokens = self.hole.tokens
        return text, filled

    def cached_ids(self) -> list:
        keys = self.job.cache_keys
        if not self.events:
            return keys[: self.reused]
        return keys + [t for c in self.canvases[: self.current] for t in c]

    def usage(self) -> dict:
        # A fill's suffix is input the client sent and the model read, not written output.
        prompt = len(self.job.ids) + (len(self.job.fill.suffix) if self.job.fill else 0)
        return {"prompt_tokens": prompt, "completion_tokens": self.tokens,
                "total_tokens": prompt + self.tokens,
                "prompt_tokens_details": {"cached_tokens": self.reused}}


class _HoleText:
    """A fill-in-the-middle answer: what the model wrote in the hole (the output positions
    before the pinned suffix), as one delta per committed canvas."""

    def __init__(self, tokenizer, plan: FillPlan, args):
        self.tokenizer, self.plan = tokenizer, plan
        self.canvas_length, self.pad = args.canvas_length, args.pad_token_id
        self.text = CommittedText(tokenizer, set(args.eos_token_ids), args.pad_token_id)
        self.written = self.tokens = 0

    def commit(self, committed: list[int]) -> tuple[str, bool]:
        """The text delta of one committed canvas and whether the hole is complete."""
        part = committed[: self.plan.hole - self.written]
        self.written += len(part)
        self.tokens += sum(t != self.pad for t in part)
        filled = self.written >= self.plan.hole
        return self.text.commit(part, final=filled), filled

    def draft(self, canvas: int, text: str) -> str:
        """A step's draft of one canvas without the suffix tokens it holds (pinned, so the
        draft ends with their text at every step)."""
        hole, start = self.plan.hole, canvas * self.canvas_length
        a, b = max(start, hole), min(start + self.canvas_length, hole + len(self.plan.suffix))
        return text.removesuffix(self.tokenizer.decode(self.plan.suffix[a - hole : b - hole])) if b > a else text


# ---------------------------------------------------------------------------- the app

@dataclass
class ServerConfig:
    """What `serve` was started with."""

    model: str
    adapter_path: str | None = None
    api_key: str | None = None
    max_queue: int = 16
    max_body_bytes: int = 4 << 20
    cache_entries: int = 4
    cache_bytes: int = 2 << 30
    text_only: bool = False
    allow_remote_images: bool = False


class Guard:
    """ASGI middleware in front of the app: the API key (every path but /health and the
    chat page's files) and the body limit (413 before the body is parsed). Plain ASGI, so
    the app still sees the client's disconnect."""

    def __init__(self, app, limit: int, api_key: str | None = None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and not self._open(scope["path"]):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                error = APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                 code="invalid_api_key")
                return await _send_error(send, error)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    @staticmethod
    def _open(path: str) -> bool:
        return path in _OPEN_PATHS or path.startswith("/static/")

    async def _refuse(self, send):
        await _send_error(send, APIError(413, f"the request body is over the limit of {self.limit} bytes"))


async def _send_error(send, error: APIError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": error.status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class _TooLarge(Exception):
    pass


class Server:
    """The FastAPI app around one `Engine`."""

    def __init__(self, config: ServerConfig, engine: Engine):
        self.config, self.engine = config, engine
        self.pending = 0
        self.seconds_per_job = 1.0
        self.app = self._build()

    @property
    def model_id(self) -> str:
        return self.config.model

    def _build(self) -> FastAPI:
        app = FastAPI(title="mlx-diffusiongemma", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(APIError, lambda r, e: e.response())
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(StarletteHTTPException, _http_error)
        app.add_exception_handler(Exception, _internal_error)
        app.get("/health")(self.health)
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/completions")(self.completions)
        app.get("/")(self.page)
        app.get("/static/{name}")(self.static)
        return app

    async def health(self):
        """Liveness and counters; never needs the API key."""
        return {"status": "ok", "pending": self.pending, **self.engine.stats}

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "mlx-diffusiongemma"}]}

    async def page(self):
        return FileResponse(STATIC_DIR / "index.html")

    async def static(self, name: str):
        path = STATIC_DIR / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no static file {name!r}")
        return FileResponse(path)

    # -- endpoints

    async def chat_completions(self, req: ChatRequest, request: Request):
        _refuse_unsupported(req)
        self._check_model(req.model)
        thinking = thinking_of(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        tools = req.tools if req.tools and req.tool_choice != "none" else None
        messages, urls = template_messages(req.messages)
        ids = await asyncio.to_thread(self._render, messages, tools, thinking)
        images, keys = [], None
        if urls:
            ids, images, keys = await asyncio.to_thread(self._images, ids, urls)
        job = self._job(req, ids, max_tokens, "messages", images=images, keys=keys)
        kind = ChatFormat(self.model_id, req)
        return await self._answer(req, request, job, kind)

    async def completions(self, req: CompletionRequest, request: Request):
        _refuse_unsupported(req)
        self._check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of several is like n > 1)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt = repair_text(prompt)
        if req.suffix:
            job = self._fill_job(req, prompt)
            return await self._answer(req, request, job, CompletionFormat(self.model_id, req))
        try:
            ids = encode_text(self.engine.tokenizer, prompt)
            check_token_ids(ids, self.engine.model.args.vocab_size, "the prompt")
            if not ids:
                raise UserError("the prompt is empty; give some text or token ids")
        except UserError as e:
            raise APIError(400, str(e), "prompt") from None
        job = self._job(req, ids, req.max_tokens, "prompt")
        return await self._answer(req, request, job, CompletionFormat(self.model_id, req))

    # -- shared steps

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_id, Path(self.model_id).name):
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists {self.model_id!r}",
                           "model", "model_not_found")

    def _render(self, messages: list[dict], tools, thinking: bool) -> list[int]:
        kwargs = {"tools": tools} if tools else {}
        try:
            ids = self.engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, enable_thinking=thinking, tokenize=True,
                return_dict=False, **kwargs)
        except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
            raise APIError(400, f"the model's chat template cannot render this request ({first_line(e)})",
                           "tools" if tools else "messages") from None
        return [int(t) for t in (ids["input_ids"] if isinstance(ids, dict) else ids)]

    def _images(self, ids: list[int], urls: list[tuple[int, str]]) -> tuple[list[int], list, list]:
        """The prompt's ids with each image's soft tokens, its `PreparedImage`s and the
        prompt cache's keys; a bad or unreadable image is a 400 naming its message."""
        from .images import check_takes_images, expand_for, prefix_keys, prepare_for

        model = self.engine.model
        try:
            check_takes_images(model)  # before any image is decoded or fetched for nothing
        except UserError as e:
            raise APIError(400, str(e), f"messages.{urls[0][0]}.content") from None
        prepared = []
        for index, url in urls:
            try:
                prepared += prepare_for(model, [self._load_image(url)])
            except UserError as e:
                raise APIError(400, str(e), f"messages.{index}.content") from None
        try:
            ids = expand_for(model, ids, prepared)
        except UserError as e:
            raise APIError(400, str(e), "messages") from None
        return ids, prepared, prefix_keys(ids, prepared, model.args.image_token_id)

    def _load_image(self, url: str):
        from .images import load_image

        if not url.startswith(("data:", "http://", "https://")):
            raise UserError(f"image_url {url[:40]!r} is not a data: or http(s) URL; send the image "
                            "as data:image/png;base64,...")
        if url.startswith("http") and not self.config.allow_remote_images:
            raise UserError("this server does not fetch image URLs (start it with --allow-remote-images); "
                            "send the image as a data: URL")
        return load_image(url, allow_remote=self.config.allow_remote_images)

    def _job(self, req: _Request, ids: list[int], max_tokens, prompt_field: str, **extra) -> Job:
        settings = self._settings(req, max_tokens)
        self._check_context(len(ids), settings.max_tokens, prompt_field,
                            f"the prompt ({len(ids)} tokens) and max_tokens={settings.max_tokens}", settings)
        return Job(ids, settings, _stops(req.stop), req.stream and req.stream_drafts, asyncio.get_running_loop(),
                   **extra)

    def _fill_job(self, req: CompletionRequest, prefix) -> Job:
        """Fill-in-the-middle: the prompt is the text before a hole of max_tokens tokens,
        the suffix is pinned after it (see `infill.plan_fill`)."""
        if not isinstance(prefix, str):
            raise APIError(400, "suffix needs the prompt as text (the text before the hole), not token ids", "suffix")
        settings = self._settings(req, req.max_tokens)  # the hole's length; pins must lie in it
        model = self.engine.model
        try:
            plan = plan_fill(model, self.engine.tokenizer, prefix, repair_text(req.suffix), settings.max_tokens)
        except UserError as e:
            raise APIError(400, str(e), "prompt") from None
        n, s = len(plan.prompt), len(plan.suffix)
        self._check_context(n, plan.hole, "prompt", f"the prompt ({n} tokens) and max_tokens={plan.hole}")
        self._check_context(n, plan.output_length, "suffix", f"the prompt ({n} tokens), a hole of "
                            f"max_tokens={plan.hole} and the suffix ({s} tokens and an end token)")
        eos = set(settings.eos_token_ids)
        if any(t in eos for _, t in settings.pinned):
            raise APIError(400, "pinned: an end-of-text token inside the hole would cut the suffix off", "pinned")
        settings = settings.updated(max_tokens=plan.output_length, pinned={**dict(settings.pinned), **plan.pinned})
        return Job(plan.prompt, settings, _stops(req.stop), req.stream and req.stream_drafts,
                   asyncio.get_running_loop(), fill=plan)

    def _settings(self, req: _Request, max_tokens) -> GenerationSettings:
        try:
            return GenerationSettings.resolve(
                self.engine.model, max_tokens=max_tokens, pinned=_pinned_of(req.pinned),
                **{name: getattr(req, name) for name in SETTING_FIELDS})
        except UserError as e:
            raise APIError(400, str(e), _setting_param(str(e))) from None

    def _check_context(self, prompt_tokens: int, output_tokens: int, param: str, what: str,
                       settings: GenerationSettings | None = None) -> None:
        args = self.engine.model.args
        cut = {} if settings is None else dict(full_canvas=settings.full_canvas,
                                               min_canvas_length=settings.min_canvas_length)
        need = context_needed(args, prompt_tokens, output_tokens, **cut)
        if need > args.max_position_embeddings:
            raise APIError(400, f"{what} (written in canvases) need {need} tokens, over the model's "
                           f"context of {args.max_position_embeddings}", param, "context_length_exceeded")

    def _admit(self, job: Job) -> None:
        # Runs on the event loop, so the counter needs no lock.
        if self.pending >= 1 + self.config.max_queue:
            wait = max(1, math.ceil(self.pending * self.seconds_per_job))
            raise APIError(503, f"the server is busy ({self.pending} requests ahead); retry later",
                           code="queue_full", headers={"Retry-After": str(wait)})
        self.pending += 1
        job.started = time.perf_counter()
        self.engine.jobs.put(job)

    def _release(self, job: Job) -> None:
        if job.released:
            return
        job.released = True
        self.pending -= 1
        elapsed = time.perf_counter() - job.started
        self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * elapsed

    async def _answer(self, req: _Request, request: Request, job: Job, fmt: "ChatFormat"):
        self._admit(job)
        if req.stream:
            return StreamingResponse(self._stream(job, fmt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await self._whole(job, request, fmt)
        finally:
            job.cancelled.set()

    async def _events(self, job: Job, timeout: float):
        """The job's events until it is done; None every `timeout` seconds of quiet."""
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout)
                except asyncio.TimeoutError:
                    yield None
                    continue
                yield kind, payload
                if kind in ("done", "error"):
                    return
        finally:
            # Normal end, disconnect or cancellation: the worker stops at its next step.
            job.cancelled.set()
            self._release(job)

    async def _whole(self, job: Job, request: Request, fmt: "ChatFormat"):
        async for item in self._events(job, 0.1):
            if item is None:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            kind, payload = item
            if kind == "delta":
                fmt.add(payload["text"], payload["final"])
            elif kind == "error":
                raise APIError(payload["status"], payload["message"])
            elif kind == "done":
                return fmt.whole(payload["finish_reason"], payload["usage"])

    async def _stream(self, job: Job, fmt: "ChatFormat"):
        include_usage = bool((fmt.req.stream_options or {}).get("include_usage"))
        try:
            async for chunk in self._stream_events(job, fmt, include_usage):
                yield chunk
        finally:
            job.cancelled.set()
            self._release(job)

    async def _stream_events(self, job: Job, fmt: "ChatFormat", include_usage: bool):
        yield _sse(fmt.first_chunk())
        async for item in self._events(job, 5.0):
            if item is None:
                yield ": keepalive\n\n"
                continue
            kind, payload = item
            if kind == "draft":
                yield _sse(fmt.draft_event(payload), event="draft")
            elif kind == "delta":
                for chunk in fmt.delta_chunks(payload["text"], payload["final"]):
                    yield _sse(chunk)
            elif kind == "error":
                yield _sse({"error": {"message": payload["message"], "type": "server_error",
                                      "param": None, "code": None}})
            elif kind == "done":
                yield _sse(fmt.last_chunk(payload["finish_reason"]))
                if include_usage:
                    yield _sse(fmt.usage_chunk(payload["usage"]))
        yield "data: [DONE]\n\n"


def _pinned_of(pinned: dict | None) -> dict | None:
    """The `pinned` extension as `GenerationSettings` takes it: JSON object keys are
    strings, so a key of digits is a position; anything else is left for its check."""
    if not pinned:
        return None
    out = {int(k) if isinstance(k, str) and re.fullmatch(r"-?[0-9]+", k) else k: v for k, v in pinned.items()}
    if len(out) != len(pinned):
        raise APIError(400, "pinned names one position twice (as keys like \"7\" and \"07\")", "pinned")
    return out


def _sse(data: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _setting_param(message: str) -> str | None:
    """The request field a settings error names first."""
    names = ("max_tokens", "pinned", *SETTING_FIELDS)
    found = [(m.start(), n) for n in names if (m := re.search(rf"\b{n}\b", message))]
    return min(found)[1] if found else None


# ---------------------------------------------------------------------------- responses

class ChatFormat:
    """Builds chat.completion bodies and chunks from committed text deltas, splitting
    thoughts and tool calls out with `OutputParser`."""

    object_name = "chat.completion"

    def __init__(self, model_id: str, req):
        self.model_id, self.req = model_id, req
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.parser = OutputParser()
        self.parsed = Parsed()
        self.n_calls = 0

    def _base(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices}

    def add(self, text: str, final: bool) -> Parsed:
        piece = self.parser.feed(text, final=final)
        self.parsed += piece
        return piece

    def _finish(self, finish: str) -> str:
        return "tool_calls" if self.parsed.tool_calls and finish == "stop" else finish

    def _tool_calls(self, calls, start: int = 0, with_index: bool = False) -> list[dict]:
        out = []
        for i, call in enumerate(calls, start):
            item = {"id": f"call_{secrets.token_hex(8)}", "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json()}}
            out.append({"index": i, **item} if with_index else item)
        return out

    def whole(self, finish: str, usage: dict) -> dict:
        message = {"role": "assistant", "content": self.parsed.content}
        if self.parsed.reasoning:
            message["reasoning_content"] = self.parsed.reasoning
        if self.parsed.tool_calls:
            message["tool_calls"] = self._tool_calls(self.parsed.tool_calls)
        choice = {"index": 0, "message": message, "finish_reason": self._finish(finish), "logprobs": None}
        if self.parser.thought_unfinished:
            choice["thinking_unfinished"] = True
        return {**self._base(self.object_name, [choice]), "usage": usage}

    def first_chunk(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return self._base("chat.completion.chunk",
                          [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}])

    def delta_chunks(self, text: str, final: bool) -> list[dict]:
        piece = self.add(text, final)
        delta: dict = {}
        if piece.reasoning:
            delta["reasoning_content"] = piece.reasoning
        if piece.content:
            delta["content"] = piece.content
        if piece.tool_calls:
            delta["tool_calls"] = self._tool_calls(piece.tool_calls, self.n_calls, with_index=True)
            self.n_calls += len(piece.tool_calls)
        return [self._chunk(delta)] if delta else []

    def last_chunk(self, finish: str) -> dict:
        chunk = self._chunk({}, self._finish(finish))
        if self.parser.thought_unfinished:
            chunk["choices"][0]["thinking_unfinished"] = True
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("chat.completion.chunk", []), "usage": usage}

    def draft_event(self, payload: dict) -> dict:
        """The `event: draft` extension: the current canvas's draft after one step."""
        return {**self._base("chat.completion.draft", []), "draft": payload}


class CompletionFormat(ChatFormat):
    """text_completion bodies and chunks: the raw text, nothing parsed out."""

    object_name = "text_completion"

    def __init__(self, model_id: str, req):
        super().__init__(model_id, req)
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.text = ""

    def add(self, text: str, final: bool) -> Parsed:
        self.text += text
        return Parsed(content=text)

    def whole(self, finish: str, usage: dict) -> dict:
        choice = {"index": 0, "text": self.text, "finish_reason": finish, "logprobs": None}
        return {**self._base(self.object_name, [choice]), "usage": usage}

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}
        return self._base("text_completion", [choice])

    def first_chunk(self) -> dict:
        return self._chunk({})

    def last_chunk(self, finish: str) -> dict:
        return self._chunk({}, finish)

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("text_completion", []), "usage": usage}


# ---------------------------------------------------------------------------- errors

async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON").response()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type to the location; the field's path is what a client needs.
    loc = [p for p in loc if not _UNION_TAG.fullmatch(p)]
    param = ".".join(loc) or None
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError(422, message, param, "invalid_type").response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed"}
    return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))).response()


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {first_line(exc)}").response()


def build_server(config: ServerConfig) -> Server:
    """Load the model (on the generation thread) and return the server around it."""
    engine = Engine(config.model, config.cache_entries, config.cache_bytes, config.adapter_path, config.text_only)
    engine.start()
    return Server(config, engine)


def asgi_app(server: Server):
    """The ASGI application with the API key and the request-size limit in front."""
    return Guard(server.app, server.config.max_body_bytes, server.config.api_key)


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    from .models.sharding import world_group

    group = world_group()
    if group is not None and group.rank() != 0:
        # Only rank 0 listens; the others hold their shards and follow its generations.
        # Ctrl-C reaches every rank of a launch: a follower ends on rank 0's quit message
        # (or when rank 0 is gone), never between the collectives of a step.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        Engine(config.model, config.cache_entries, config.cache_bytes, config.adapter_path, config.text_only).follow()
        return
    server = build_server(config)
    try:
        uvicorn.run(asgi_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
    finally:
        server.engine.stop()
