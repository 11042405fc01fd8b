"""Fill-in-the-middle (`suffix` on /v1/completions) and the `pinned` extension, through a
real `serve` process and the official `openai` client; what the server writes is checked
against `infill` and `generate` run here on the same tiny model with the same seed."""

import http.client
import json

import openai
import pytest
from server_fixtures import CANVAS, ServerProcess, tools_chat_model

from mlx_diffusiongemma import load
from mlx_diffusiongemma.generate import generate
from mlx_diffusiongemma.infill import infill

FAST = dict(max_denoising_steps=3)
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"
USER = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tools_chat_model(tmp_path_factory.mktemp("fim_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "fim.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model and tokenizer loaded in this process."""
    return load(model_dir)


def ids_of(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False))


def fim(client, prefix=PREFIX, suffix=SUFFIX, max_tokens=12, seed=0, **extra):
    return client.completions.create(model=client.models.list().data[0].id, prompt=prefix, suffix=suffix,
                                     max_tokens=max_tokens, seed=seed, extra_body={**FAST, **extra})


def raw(server, path, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return r.status, json.loads(text)


def sse_events(server, path, body):
    """(event name, data) pairs of one streamed request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json"})
    response, event, data, out = conn.getresponse(), None, [], []
    for line in response.read().decode().split("\n"):
        if line == "":
            if data:
                out.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    conn.close()
    return out


@pytest.mark.parametrize("seed", [0, 5])
def test_fim_text_is_what_infill_writes_in_the_hole_and_the_suffix_is_pinned_after_it(client, local, seed):
    model, tokenizer = local
    n = 12
    r = fim(client, max_tokens=n, seed=seed)
    choice = r.choices[0]
    expected = infill(model, tokenizer, f"{PREFIX}<fill>{n}</fill>{SUFFIX}", seed=seed, **FAST)
    # The layout: n free tokens, then the suffix's own tokens (and the end token) pinned.
    suffix_ids = ids_of(tokenizer, SUFFIX)
    assert expected.lengths == (n,) and expected.tokens[n:] == suffix_ids
    assert choice.text == expected.fills[0] and SUFFIX not in choice.text
    # Reassembled, the prompt, the answer and the suffix are the filled text, the suffix byte for byte.
    assert PREFIX + choice.text + SUFFIX == expected.text
    assert tokenizer.decode(ids_of(tokenizer, PREFIX) + expected.tokens) == PREFIX + choice.text + SUFFIX
    assert choice.finish_reason == "stop"
    prompt_ids = [tokenizer.bos_token_id] + ids_of(tokenizer, PREFIX)
    assert r.usage.prompt_tokens == len(prompt_ids) + len(suffix_ids)
    assert r.usage.completion_tokens == sum(t != model.args.pad_token_id for t in expected.tokens[:n])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_fim_streamed_matches_the_whole_answer(client):
    whole = fim(client, max_tokens=2 * CANVAS + 3, seed=2)
    stream = client.completions.create(model=client.models.list().data[0].id, prompt=PREFIX, suffix=SUFFIX,
                                       max_tokens=2 * CANVAS + 3, seed=2, stream=True,
                                       stream_options={"include_usage": True}, extra_body=FAST)
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].text
    assert sum(1 for p in pieces if p) >= 2  # one delta per committed canvas of the hole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_fim_drafts_show_the_hole_only(server, client, local):
    _, tokenizer = local
    suffix = "XYZW and the rest"
    n = CANVAS + 2  # the second canvas holds the hole's end and "XYZW" of the suffix
    events = sse_events(server, "/v1/completions", dict(prompt=PREFIX, suffix=suffix, max_tokens=n, seed=1,
                                                        stream_drafts=True, max_denoising_steps=4))
    drafts = [json.loads(d)["draft"] for e, d in events if e == "draft"]
    assert {d["canvas"] for d in drafts} == {0, 1}
    assert all("XYZW" not in d["text"] for d in drafts)
    assert len(ids_of(tokenizer, suffix)) > 4
    chunks = [json.loads(d) for e, d in events if e is None and d != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == fim(client, suffix=suffix, max_tokens=n, seed=1, max_denoising_steps=4).choices[0].text


def test_a_fully_pinned_hole_comes_back_exactly(client, local):
    _, tokenizer = local
    body = ids_of(tokenizer, "return a + b")
    r = fim(client, max_tokens=len(body), pinned={str(i): t for i, t in enumerate(body)})
    assert r.choices[0].text == "return a + b"


def test_pinned_tokens_hold_their_positions_in_completions(client, local):
    model, tokenizer = local
    start = ids_of(tokenizer, "Hello")
    pinned = {**dict(enumerate(start)), 9: ids_of(tokenizer, "Z")[0], 13: ids_of(tokenizer, "Q")[0]}
    r = client.completions.create(model=client.models.list().data[0].id, prompt="Once upon a time", max_tokens=16,
                                  seed=4, extra_body={**FAST, "pinned": {str(p): t for p, t in pinned.items()}})
    text = r.choices[0].text
    assert text.startswith("Hello")
    assert text == generate(model, tokenizer, "Once upon a time", max_tokens=16, seed=4, pinned=pinned, **FAST)
    unpinned = client.completions.create(model=client.models.list().data[0].id, prompt="Once upon a time",
                                         max_tokens=16, seed=4, extra_body=FAST).choices[0].text
    assert not unpinned.startswith("Hello")


def test_pinned_tokens_and_an_end_token_shape_a_chat_answer(client, local):
    _, tokenizer = local
    words = ids_of(tokenizer, "Sure thing")
    pinned = {**{str(i): t for i, t in enumerate(words)}, str(len(words)): tokenizer.eos_token_id}
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=USER, max_tokens=16, seed=0,
                                       extra_body={**FAST, "pinned": pinned})
    assert r.choices[0].message.content == "Sure thing"
    assert r.choices[0].finish_reason == "stop"


BAD = [
    ("/v1/completions", {"prompt": [2, 10, 11], "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"prompt": ["a", "b"], "suffix": "x"}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "suffix": "x" * 5000, "max_tokens": 8}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x" * 5000, "suffix": "y", "max_tokens": 8}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "suffix": 5}, 422, "suffix"),
    ("/v1/completions", {"prompt": "a", "suffix": "b", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "suffix": "b", "max_tokens": 8, "pinned": {"8": 400}}, 400, "pinned"),
    ("/v1/completions", {"prompt": "a", "suffix": "b", "max_tokens": 8, "pinned": {"3": 1}}, 400, "pinned"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 8, "pinned": {"0": -3}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"0": 999999}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"8": 400}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"0": 1.5}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"0": "400"}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"0": True}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"first": 400}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"-1": 400}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"2.5": 400}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": {"7": 400, "07": 401}}, 400, "pinned"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "pinned": [[0, 400]]}, 422, "pinned"),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_suffix_or_pinned_is_an_openai_error_before_any_work(server, client, path, body, status, param):
    before = server.health()
    got, error = raw(server, path, body)
    assert got == status, error
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]
    assert error["error"]["param"] == param and "\n" not in error["error"]["message"]
    after = server.health()
    assert (after["generations"], after["errors"]) == (before["generations"], before["errors"])
    assert fim(client, max_tokens=4, max_denoising_steps=1).choices[0].finish_reason == "stop"


def test_openai_client_raises_bad_request_for_a_suffix_after_token_ids(client):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=client.models.list().data[0].id, prompt=[2, 10, 11], suffix="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        fim(client, suffix="y" * 5000, max_tokens=8)
