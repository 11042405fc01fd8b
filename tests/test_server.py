"""The OpenAI-compatible server, run as a real `serve` process on a free localhost port
and driven by the official `openai` client (raw HTTP where the client would hide what is
tested: malformed bodies, SSE draft events, a client that goes away)."""

import http.client
import json
import os
import threading
import time

import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlx_diffusiongemma.server import ChatFormat
from server_fixtures import CANVAS, ServerProcess, tools_chat_model

FAST = dict(max_denoising_steps=3)
USER = [{"role": "user", "content": "What is 2+2?"}]
# A generation of many whole 48-step canvases: it runs for a long while unless cancelled.
LONG = dict(max_tokens=2000, max_denoising_steps=48)
KEY = "test-key-123"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tools_chat_model(tmp_path_factory.mktemp("server_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "open.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    """A server with an API key (from the environment variable), a one-place queue and a
    small body limit."""
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "guarded.log",
                         "--max-queue", "1", "--max-body-bytes", "65536",
                         env={"MLX_DIFFUSIONGEMMA_API_KEY": KEY})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def model_id(client):
    return client.models.list().data[0].id


def chat(client, messages=USER, **extra):
    extra = {**FAST, **extra}
    max_tokens = extra.pop("max_tokens", 16)
    seed = extra.pop("seed", 0)
    return client.chat.completions.create(model=model_id(client), messages=messages, max_tokens=max_tokens,
                                          seed=seed, extra_body=extra)


def raw(server, method, path, body=None, headers=None, timeout=60):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), text


def sse_events(response):
    """(event name, data) pairs of a server-sent event stream, read as they arrive."""
    event, data = None, []
    while True:
        line = response.readline()
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def open_stream(server, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def test_models_lists_the_loaded_model_with_an_id_clients_send_back(client, server, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(model_dir)]
    assert chat(client, model=models[0].id).choices[0].message.content is not None
    status, _, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_chat_is_openai_shaped_and_the_stream_reassembles_to_it(client):
    whole = chat(client, seed=7)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(model=model_id(client), messages=USER, max_tokens=16, seed=7,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=FAST)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    # One delta per committed canvas (16 tokens = 2 canvases of 8), not one for everything.
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_different_seeds_give_different_text(client):
    assert chat(client, seed=1).choices[0].message.content != chat(client, seed=2).choices[0].message.content


def test_completions_whole_and_streamed(client):
    kwargs = dict(model=model_id(client), prompt="Once upon a time", max_tokens=16, seed=3, extra_body=FAST)
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == whole.choices[0].text


@pytest.mark.parametrize("levers", [
    dict(fast=True),
    dict(sampler="confidence", threshold=0.5, max_denoising_steps=4),
    dict(full_canvas=False, min_canvas_length=1, self_conditioning_top_k=4),
])
def test_speed_levers_give_what_the_python_api_gives(client, model_dir, levers):
    from mlx_diffusiongemma import generate, load

    model, tokenizer = load(model_dir)
    prompt, seed, max_tokens = "Once upon a time", 9, CANVAS + 3
    got = client.completions.create(model=model_id(client), prompt=prompt, max_tokens=max_tokens, seed=seed,
                                    extra_body=levers)
    assert got.choices[0].text == generate(model, tokenizer, prompt, seed=seed, max_tokens=max_tokens, **levers)
    # A cut final canvas writes exactly max_tokens; whole canvases write two.
    assert got.usage.completion_tokens == (max_tokens if "full_canvas" in levers else 2 * CANVAS)


def test_second_turn_reuses_the_first_turns_encoder_cache(client):
    first = chat(client, messages=[{"role": "user", "content": "Tell me a story about a dragon."}], seed=11)
    answer = first.choices[0].message.content
    second = chat(client, seed=12, messages=[
        {"role": "user", "content": "Tell me a story about a dragon."},
        {"role": "assistant", "content": answer}, {"role": "user", "content": "Shorter."}])
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Everything before the generation prompt's empty thought block (10 tokens) is reused.
    assert first.usage.prompt_tokens - 10 <= cached < second.usage.prompt_tokens


def test_stop_strings_cut_the_text_and_finish_with_stop(client):
    text = chat(client, seed=5, max_tokens=32).choices[0].message.content
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    cut = chat(client, seed=5, max_tokens=32, stop=[stop, "never-seen"])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_thinking_switch_and_tools_reach_the_chat_template(client, tokenizer):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "units": {"t": "C"}})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny {22} \"C\""},
    ]
    expected = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "units": {"t": "C"}}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny {22} \"C\""},
    ]
    for thinking, extra in ((True, dict(chat_template_kwargs={"enable_thinking": True})),
                            (True, dict(reasoning_effort="high")), (False, {})):
        r = client.chat.completions.create(model=model_id(client), messages=messages, tools=tools, max_tokens=8,
                                           seed=0, extra_body={**FAST, **extra})
        ids = tokenizer.apply_chat_template(expected, tools=tools, add_generation_prompt=True,
                                            enable_thinking=thinking, tokenize=True)
        assert r.usage.prompt_tokens == len(ids)
    # tool_choice "none" leaves the declarations out.
    r = client.chat.completions.create(model=model_id(client), messages=expected[:1], tools=tools,
                                       tool_choice="none", max_tokens=8, seed=0, extra_body=FAST)
    plain = tokenizer.apply_chat_template(expected[:1], add_generation_prompt=True, enable_thinking=False,
                                          tokenize=True)
    assert r.usage.prompt_tokens == len(plain)


def test_draft_events_stream_each_step_when_asked(server, client):
    conn, response = open_stream(server, dict(model=model_id(client), messages=USER, max_tokens=16, seed=4,
                                              max_denoising_steps=4, stream_drafts=True))
    events = list(sse_events(response))
    conn.close()
    drafts = [json.loads(d)["draft"] for e, d in events if e == "draft"]
    chunks = [json.loads(d) for e, d in events if e is None and d != "[DONE]"]
    assert events[-1] == (None, "[DONE]")
    assert drafts and all(set(d) == {"canvas", "step", "text"} for d in drafts)
    assert {d["canvas"] for d in drafts} == {0, 1}
    steps = [d["step"] for d in drafts if d["canvas"] == 0]
    assert steps == list(range(1, len(steps) + 1))
    assert len({d["text"] for d in drafts}) > 1  # the canvas changes as it resolves
    # Drafts are their own event type: the chunks alone reassemble to the plain answer.
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == chat(client, seed=4, max_denoising_steps=4).choices[0].message.content
    # Without the field no draft is sent.
    conn, response = open_stream(server, dict(model=model_id(client), messages=USER, max_tokens=16, seed=4,
                                              max_denoising_steps=4))
    assert all(e is None for e, _ in sse_events(response))
    conn.close()


@pytest.mark.parametrize("body, status, param", [
    (b'{"messages": [', 400, None),
    ({"messages": "hello"}, 422, "messages"),
    ({"messages": USER, "max_tokens": "lots"}, 422, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": USER, "model": "gpt-4o"}, 404, "model"),
    ({"messages": USER, "stop": 5}, 422, "stop"),
    ({"messages": USER, "stream": "yes"}, 422, "stream"),
    ({"messages": USER, "reasoning_effort": "extreme"}, 422, "reasoning_effort"),
    ({"messages": USER, "chat_template_kwargs": {"enable_thinking": "on"}}, 422,
     "chat_template_kwargs.enable_thinking"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     400, "messages.0.tool_calls"),
    ({"messages": USER, "n": 2}, 400, "n"),
    ({"messages": USER, "logprobs": True}, 400, "logprobs"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": USER, "tool_choice": "required", "tools": []}, 400, "tool_choice"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": USER, "t_min": 0.9, "t_max": 0.5}, 400, "t_max"),
    ({"messages": USER, "sampler": "greedy"}, 400, "sampler"),
    ({"messages": USER, "threshold": 1.5}, 400, "threshold"),
    ({"messages": USER, "min_canvas_length": 0}, 400, "min_canvas_length"),
    ({"messages": USER, "self_conditioning_top_k": -1}, 400, "self_conditioning_top_k"),
    ({"messages": USER, "full_canvas": "no"}, 422, "full_canvas"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content"),
])
def test_bad_requests_get_their_status_and_an_openai_error(server, body, status, param):
    got, _, error = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status, error
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]
    assert error["error"]["param"] == param
    assert raw(server, "GET", "/health")[0] == 200


@pytest.mark.parametrize("prompt", [[2, 10, 999999], [], "   ", ["one", "two"]])
def test_bad_completion_prompts_are_400_before_any_work(server, prompt):
    before = server.health()
    status, _, error = raw(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8})
    assert status == 400 and error["error"]["param"] == "prompt", error
    after = server.health()
    assert (after["generations"], after["errors"]) == (before["generations"], before["errors"])


def test_too_long_prompt_is_refused_before_any_work(server):
    before = server.health()
    _, _, error = raw(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]})
    assert error["error"]["code"] == "context_length_exceeded"
    after = server.health()
    assert (after["generations"], after["errors"]) == (before["generations"], before["errors"])


def test_openai_client_raises_the_matching_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model=model_id(client), messages=USER, n=3)
    with pytest.raises(openai.NotFoundError):
        client.post("/nowhere", cast_to=dict, body={})


def test_auth_on_guards_every_endpoint_but_health(guarded):
    base = f"{guarded.base}/v1"
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=base, api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert raw(guarded, "POST", "/v1/chat/completions", {"messages": USER})[0] == 401
    assert raw(guarded, "GET", "/health")[0] == 200
    good = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
    assert good.chat.completions.create(model=good.models.list().data[0].id, messages=USER, max_tokens=8,
                                        extra_body=FAST).choices[0].message.content is not None


def test_auth_off_needs_no_key(server):
    status, _, body = raw(server, "GET", "/v1/models")
    assert status == 200 and body["data"]


def test_oversized_body_is_413(guarded, server):
    big = {"messages": [{"role": "user", "content": "y" * 70000}]}
    status, _, error = raw(guarded, "POST", "/v1/chat/completions", big, {"Authorization": f"Bearer {KEY}"})
    assert status == 413 and "limit" in error["error"]["message"]
    # Past the default 4 MiB limit of the open server too.
    status, _, _ = raw(server, "POST", "/v1/chat/completions", b"{" + b" " * (5 << 20) + b"}")
    assert status == 413
    assert raw(server, "GET", "/health")[0] == 200


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_full_queue_is_503_with_retry_after_and_a_killed_client_frees_the_server(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = dict(messages=USER, seed=1, stream_drafts=True, **LONG)
    running, response = open_stream(guarded, body, auth)
    first = next(e for e, _ in sse_events(response) if e == "draft")  # it is generating now
    assert first == "draft"
    waiting, waiting_response = open_stream(guarded, body, auth)  # fills the one-place queue
    wait_for(lambda: guarded.health()["pending"] == 2)
    status, headers, error = raw(guarded, "POST", "/v1/chat/completions", {"messages": USER, **FAST}, auth)
    assert status == 503 and int(headers["retry-after"]) >= 1 and error["error"]["code"] == "queue_full"

    before = guarded.health()
    tic = time.monotonic()
    running.close()  # the client goes away mid-stream
    waiting.close()  # and the queued one too, before its turn
    after = wait_for(lambda: (h := guarded.health())["cancelled"] >= before["cancelled"] + 2 and h)
    freed = time.monotonic() - tic
    assert after["pending"] == 0 and freed < 10, after
    good = openai.OpenAI(base_url=f"{guarded.base}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert good.chat.completions.create(model=good.models.list().data[0].id, messages=USER, max_tokens=8,
                                        extra_body=FAST).choices
    assert guarded.health()["status"] == "ok"


def test_a_non_streaming_client_that_goes_away_is_cancelled(server):
    before = server.health()["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": USER, **LONG}).encode(),
                 headers={"Content-Type": "application/json"})
    wait_for(lambda: server.health()["pending"] == 1)
    conn.sock.close()
    wait_for(lambda: server.health()["cancelled"] == before + 1)
    assert server.health()["pending"] == 0


def test_eight_concurrent_clients_get_what_sequential_requests_get(client):
    requests = [dict(messages=[{"role": "user", "content": f"client {c} request {r}"}], seed=100 * c + r)
                for c in range(8) for r in range(5)]
    sequential = [chat(client, **req).choices[0].message.content for req in requests]
    results, errors = [None] * len(requests), []

    def worker(c):
        try:
            for r in range(5):
                i = 5 * c + r
                results[i] = chat(client, **requests[i]).choices[0].message.content
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert results == sequential


# ------------------------------------------------------------ the response builder, by hand

def model_outputs_by_canvas():
    """Hand-written outputs as the model would commit them, canvas by canvas: a thought,
    an answer, two calls (one split across canvases) with nested JSON and tricky strings."""
    return [
        "<|channel>thought\nThe user wants wea",
        "ther.<channel|>Checking.<|tool_call>call:get_weather{city:<|\"|>Pa",
        "ris {1} \"x\"<|\"|>,opts:{units:[<|\"|>C<|\"|>],n:2}}<tool_call|><|tool_call>call:now{}<tool_call|>",
    ]


def test_thoughts_and_tool_calls_are_split_the_same_streamed_or_whole():
    whole = ChatFormat("m", None)
    for i, text in enumerate(model_outputs_by_canvas()):
        whole.add(text, final=i == 2)
    body = whole.whole("stop", usage={})
    message = body["choices"][0]["message"]
    assert message["content"] == "Checking."
    assert message["reasoning_content"] == "The user wants weather."
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [
        {"city": "Paris {1} \"x\"", "opts": {"units": ["C"], "n": 2}}, {}]
    assert body["choices"][0]["finish_reason"] == "tool_calls"

    streamed = ChatFormat("m", None)
    deltas = [c["choices"][0]["delta"] for i, t in enumerate(model_outputs_by_canvas())
              for c in streamed.delta_chunks(t, final=i == 2)]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert streamed.last_chunk("stop")["choices"][0]["finish_reason"] == "tool_calls"


def test_an_answer_that_never_leaves_the_thought_channel_is_flagged():
    fmt = ChatFormat("m", None)
    fmt.add("<|channel>thought\nhmm, let me think about this for a long", final=True)
    choice = fmt.whole("length", usage={})["choices"][0]
    assert choice["message"]["content"] == "" and choice["thinking_unfinished"] is True
    assert choice["message"]["reasoning_content"].startswith("hmm")


def test_serve_with_a_missing_model_is_one_line_and_exit_1_and_warns_off_loopback(tmp_path):
    import subprocess
    import sys

    # The model fails to load before anything binds, so 0.0.0.0 is never listened on.
    r = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma", "serve", "--model", str(tmp_path / "nope"),
                        "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "MLX_DIFFUSIONGEMMA_API_KEY"})
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "without an API key" in r.stderr


def test_the_prompt_cache_lru_hands_out_the_longest_prefix_and_stays_bounded(model_dir):
    import mlx.core as mx

    from mlx_diffusiongemma import load
    from mlx_diffusiongemma.server import PromptCacheLRU

    model, _ = load(model_dir)
    lru = PromptCacheLRU(model, keep=64, max_entries=2)

    def fill(ids):
        entry, reused = lru.take(ids)
        model.encode(mx.array([ids[reused:]], dtype=mx.int32), entry.cache)
        entry.record(ids)
        lru.put(entry)
        return reused

    a, b, c = [2, 10, 11, 12, 13], [2, 20, 21, 22], [2, 30, 31]
    assert [fill(a), fill(b)] == [0, 1]  # b shares only <bos> with a: a is forked, not lost
    assert fill(a[:4] + [99]) == 4  # the longest shared prefix is reused
    assert fill(a + [50, 51]) == 5  # a is still whole
    assert len(lru.entries) == 2  # bounded: the oldest went
    assert sorted(e.ids[-1] for e in lru.entries.values()) == [51, 99]
    # A forked entry's cache equals a fresh encoding of the same ids.
    entry, reused = lru.take(a + [50, 51, 52])
    assert reused == 7
    fresh = model.make_cache(keep=64)
    model.encode(mx.array([a + [50, 51]], dtype=mx.int32), fresh)
    assert all(mx.array_equal(x.keys, y.keys) for x, y in zip(entry.cache, fresh))
    lru.put(entry)
    one = max(e.nbytes for e in lru.entries.values())
    lru.max_bytes = one
    fill(c)
    assert len(lru.entries) == 1 and lru.nbytes <= one
