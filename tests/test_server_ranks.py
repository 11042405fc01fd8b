"""`serve` across two ranks (`mlx.launch --backend ring` on 127.0.0.1): rank 0 answers the
real `openai` client while the other rank holds half of every layer and follows each
generation step by step. Checked against one process running the whole model."""

import http.client
import json
import os
import threading
import time

import pytest

from mlx_diffusiongemma import generate, load
from mlx_diffusiongemma.chat import ChatSession
from mlx_diffusiongemma.tool_parsing import OutputParser
from server_fixtures import CANVAS, ServerProcess, tools_chat_model
from vision_fixtures import data_url, picture, vision_chat_model

# Argmax decoding: the ranks' partial sums add up in another order than one process's, so
# only a regime whose tokens do not hang on the last bits can be compared token for token.
EXACT = dict(t_min=1e-3, t_max=2e-3, entropy_bound=1e9, max_denoising_steps=6)
PROMPT = "Once upon a time there was a"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tools_chat_model(tmp_path_factory.mktemp("ranks_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "ranks.log", ranks=2, timeout=300)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def local(model_dir):
    return load(model_dir)


def complete(client, prompt: str, max_tokens: int = 2 * CANVAS, **extra):
    model = client.models.list().data[0].id
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, seed=0,
                                     extra_body={**EXACT, **extra})


def one_process(local, prompt: str, max_tokens: int = 2 * CANVAS) -> str:
    model, tokenizer = local
    return generate(model, tokenizer, prompt, seed=0, max_tokens=max_tokens, **EXACT)


@pytest.mark.parametrize("prompt", [PROMPT, "Hi", "A much longer prompt that runs past the sliding window " * 2])
def test_two_ranks_write_what_one_process_writes(client, local, prompt):
    got = complete(client, prompt)
    assert got.choices[0].text == one_process(local, prompt)
    assert got.usage.completion_tokens == 2 * CANVAS


def test_a_cut_final_canvas_across_ranks_writes_what_one_process_writes(client, local):
    model, tokenizer = local
    got = complete(client, PROMPT, CANVAS + 3, full_canvas=False, min_canvas_length=1)
    assert got.usage.completion_tokens == CANVAS + 3
    assert got.choices[0].text == generate(model, tokenizer, PROMPT, seed=0, max_tokens=CANVAS + 3,
                                           full_canvas=False, min_canvas_length=1, **EXACT)


def test_a_setting_the_sharded_model_refuses_is_a_400_and_the_ranks_keep_serving(client, local):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        complete(client, PROMPT, self_conditioning_top_k=300)  # of 512 tokens, 256 per rank
    assert "smallest rank's vocabulary slice" in str(e.value)
    assert complete(client, "Hi").choices[0].text == one_process(local, "Hi")


def test_the_confidence_sampler_across_ranks_writes_what_one_process_writes(client, local):
    model, tokenizer = local
    got = complete(client, PROMPT, sampler="confidence", threshold=0.9999)
    assert got.choices[0].text == generate(model, tokenizer, PROMPT, seed=0, max_tokens=2 * CANVAS,
                                           sampler="confidence", threshold=0.9999, **EXACT)


def test_fill_in_the_middle_across_ranks_fills_what_one_process_fills(client, local):
    from mlx_diffusiongemma.infill import infill

    model, tokenizer = local
    prefix, suffix, n = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n", 12
    got = client.completions.create(model=client.models.list().data[0].id, prompt=prefix, suffix=suffix,
                                    max_tokens=n, seed=0, extra_body=EXACT)
    expected = infill(model, tokenizer, f"{prefix}<fill>{n}</fill>{suffix}", seed=0, **EXACT)
    assert got.choices[0].text == expected.fills[0]


def test_chat_across_ranks_streams_what_it_answers_whole(client):
    model = client.models.list().data[0].id
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=2 * CANVAS,
                  seed=1, extra_body=EXACT)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert whole and streamed == whole


def test_a_stop_string_ends_every_rank_at_the_same_step_and_the_next_prompt_reuses_the_cache(client, local):
    text = one_process(local, PROMPT, 3 * CANVAS)
    # A stop string in the second canvas: rank 0 ends the generation there, one canvas early.
    stop = text[len(one_process(local, PROMPT, CANVAS)):][2:6]
    assert stop.strip(), text
    cut = complete(client, PROMPT, 3 * CANVAS, stop=[stop]).choices[0].text
    assert cut == text[: text.index(stop)]
    # The cache each rank kept holds the prompt and the first canvas: a prompt that extends
    # them reuses it, and the follower's half must be the same cache for the tokens to match.
    longer = PROMPT + one_process(local, PROMPT, CANVAS)
    again = complete(client, longer)
    assert again.choices[0].text == one_process(local, longer)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_four_concurrent_clients_across_ranks_get_what_one_process_writes(client, local):
    prompts = [f"client {c} asks about number {c * 7}" for c in range(4)]
    results, errors = [None] * 4, []

    def worker(c):
        try:
            results[c] = complete(client, prompts[c]).choices[0].text
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert results == [one_process(local, p) for p in prompts]


def test_a_client_that_goes_away_mid_generation_leaves_the_ranks_in_step(server, client, local):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = dict(prompt=PROMPT, max_tokens=200 * CANVAS, stream=True, max_denoising_steps=48, seed=0)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first canvas arrived: the ranks are mid-generation
    conn.close()
    deadline = time.monotonic() + 60
    while server.health()["cancelled"] < 1:
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.2)
    assert complete(client, "Hi").choices[0].text == one_process(local, "Hi")


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranks_vision_model")
    vision_chat_model(path)
    return path


def test_an_image_across_ranks_answers_what_one_process_answers_and_is_reused(vision_dir, tmp_path):
    server = ServerProcess(vision_dir, tmp_path / "vision.log", ranks=2, timeout=300)
    try:
        client = server.client()
        image = picture(24, 36, seed=1)
        url = data_url(image)
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
        kwargs = dict(model=client.models.list().data[0].id, max_tokens=2 * CANVAS, seed=0, extra_body=EXACT)
        first = client.chat.completions.create(messages=[{"role": "user", "content": content}], **kwargs)
        model, tokenizer = load(vision_dir, text_only=False)
        session = ChatSession(model, tokenizer, max_tokens=2 * CANVAS, seed=0, **EXACT)
        text = "".join(part.text for part in session.reply("What is this?", images=[image]))
        assert first.choices[0].message.content == OutputParser().feed(text, final=True).content
        # A follow-up reuses the image's encoding on every rank (the follower's cache must
        # hold the same prefix, or the answer would differ from one process's).
        history = [{"role": "user", "content": content}, {"role": "assistant", "content": "A gradient."}]
        again = client.chat.completions.create(
            messages=[*history, {"role": "user", "content": "And the colours?"}], **kwargs)
        assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 12
        session.messages[-1]["content"] = "A gradient."
        text = "".join(part.text for part in session.reply("And the colours?"))
        assert again.choices[0].message.content == OutputParser().feed(text, final=True).content
    finally:
        assert server.stop(timeout=60) is not None


def test_ctrl_c_ends_every_rank(server):
    # Last in this module: it stops the module's server.
    assert server.stop(timeout=60) is not None
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(server.proc.pid, 0)  # some process of the launch is still there
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a rank outlived Ctrl-C"
        time.sleep(0.2)
