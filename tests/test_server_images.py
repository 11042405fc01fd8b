"""Image input on `/v1/chat/completions` through a real `serve` process and the official
`openai` client: `image_url` parts with data: URLs (remote URLs only when the server
allows them), checked against `ChatSession` run here on the same tiny vision model with
the same seed, the prompt cache matched on the images' pixels, and bad images as 400s."""

import base64
import functools
import http.server
import threading

import openai
import pytest
from server_fixtures import ServerProcess
from vision_fixtures import data_url, picture, png, vision_chat_model

from mlx_diffusiongemma import load
from mlx_diffusiongemma.chat import ChatSession
from mlx_diffusiongemma.tool_parsing import OutputParser

SETTINGS = dict(max_tokens=16, max_denoising_steps=3, seed=0)
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vision_server_model")
    vision_chat_model(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "images.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def ask(client, url: str, text: str = QUESTION, history=(), **extra):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[*history, {"role": "user", "content": content}],
        max_tokens=SETTINGS["max_tokens"], seed=SETTINGS["seed"],
        extra_body={"max_denoising_steps": SETTINGS["max_denoising_steps"]}, **extra)


def test_an_image_answer_equals_a_local_chat_session(client, model_dir):
    image = picture(24, 36, seed=1)
    r = ask(client, data_url(image))
    model, tokenizer = load(model_dir, text_only=False)
    session = ChatSession(model, tokenizer, **SETTINGS)
    text = "".join(part.text for part in session.reply(QUESTION, images=[image]))
    assert r.choices[0].message.content == OutputParser().feed(text, final=True).content
    assert r.usage.prompt_tokens == session.last_turn.prompt_tokens
    # Far more than the words: the image's soft tokens are in the prompt.
    words = len(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True))
    assert r.usage.prompt_tokens > words + 20


def test_the_same_image_is_reused_and_another_is_not(client):
    first, other = data_url(picture(24, 36, seed=2)), data_url(picture(24, 36, seed=3))
    r1 = ask(client, first)
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": first}},
                                            {"type": "text", "text": QUESTION}]},
               {"role": "assistant", "content": "A gradient."}]  # the random model's own text may hold <|image|>
    follow = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[*history, {"role": "user", "content": "And the colours?"}],
        max_tokens=8, seed=0, extra_body={"max_denoising_steps": 2})
    # The follow-up reuses the first prompt, image included, up to its generation prompt
    # (an empty thought block that the history no longer holds).
    assert follow.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 12
    again = ask(client, other)
    # Same words, another image: at most the tokens before the image are reused.
    assert again.usage.prompt_tokens_details.cached_tokens < 12
    assert again.usage.prompt_tokens == r1.usage.prompt_tokens


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:9/p.png", "does not fetch image URLs"),
    ("/etc/passwd", "is not a data: or http(s) URL"),
    ("data:image/png;base64,!!!", "data: URL"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not an image"),
])
def test_bad_images_are_400s_and_the_server_keeps_serving(client, url, message):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, url)
    assert message in e.value.body["message"] and "\n" not in e.value.body["message"]
    assert e.value.body["param"] == "messages.0.content"
    assert ask(client, data_url(picture(12, 12))).choices[0].finish_reason in ("stop", "length")


def test_other_part_types_and_a_missing_url_are_400s(client):
    for content, message in (([{"type": "input_audio", "input_audio": {}}], "not supported (text and image_url)"),
                             ([{"type": "image_url", "image_url": {}}], "an image_url part needs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}], max_tokens=8)
        assert message in e.value.body["message"]


def test_text_only_server_refuses_images(model_dir, tmp_path):
    proc = ServerProcess(model_dir, tmp_path / "text_only.log", "--text-only")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            ask(proc.client(), data_url(picture(12, 12)))
        assert "loaded text-only" in e.value.body["message"]
    finally:
        proc.stop()


def test_remote_images_only_with_allow_remote_images(model_dir, tmp_path):
    image = picture(24, 36, seed=4)
    (tmp_path / "p.png").write_bytes(png(image))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    proc = ServerProcess(model_dir, tmp_path / "remote.log", "--allow-remote-images")
    try:
        client = proc.client()
        fetched = ask(client, f"http://127.0.0.1:{files.server_address[1]}/p.png")
        assert fetched.choices[0].message.content == ask(client, data_url(image)).choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, f"http://127.0.0.1:{files.server_address[1]}/missing.png")
        assert "404" in e.value.body["message"]
    finally:
        proc.stop()
        files.shutdown()
