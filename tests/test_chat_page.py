"""The chat page at `/` in a real headless Chromium (Debian's, driven over the DevTools
protocol) against a real server: a message is sent, the drafts are seen changing, and the
committed text shown is what the API returns for the same seed."""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websockets

from server_fixtures import ServerProcess, free_port, tools_chat_model

# Never skipped: .ci/run installs Debian's chromium (apt-get install chromium).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
SEED, MAX_TOKENS, STEPS = 5, 48, 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tools_chat_model(tmp_path_factory.mktemp("page_model"))
    proc = ServerProcess(model, tmp_path_factory.mktemp("logs") / "page.log")
    yield proc
    proc.stop()


@pytest.fixture
def browser(tmp_path):
    proc, ws_url = launch_chromium(tmp_path)
    yield ws_url
    proc.terminate()
    proc.wait(15)


def launch_chromium(tmp_path: Path):
    """Headless Chromium with its DevTools port open: (process, the page's websocket URL)."""
    port = free_port()
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}",
                             "--window-size=1000,700", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
            if pages:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("chromium did not open its DevTools port")
        time.sleep(0.3)
    return proc, pages[0]["webSocketDebuggerUrl"]


class Page:
    """Just enough of the DevTools protocol: commands and JavaScript evaluation."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def send(self, method, **params):
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]

    async def js(self, expression):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    async def until(self, expression, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {expression}")


async def chat_in_page(ws_url, base, screenshot: Path, prompt="What is 2+2?", max_tokens=MAX_TOKENS,
                       steps=STEPS, drafts_before_shot=3):
    """Send `prompt` from the page; screenshot mid-canvas; return what the page showed."""
    async with websockets.connect(ws_url, max_size=1 << 26) as ws:
        page = Page(ws)
        await page.send("Page.enable")
        await page.send("Page.navigate", url=f"{base}/?seed={SEED}")
        await page.until("document.readyState === 'complete' && document.getElementById('model').textContent")
        await page.js(f"document.getElementById('max-tokens').value = '{max_tokens}';"
                      f"document.getElementById('steps').value = '{steps}';"
                      f"document.getElementById('input').value = {json.dumps(prompt)};"
                      "document.getElementById('composer').requestSubmit(); true")
        # Mid-canvas: a draft is on screen and nothing has finished yet.
        await page.until("document.querySelector('.assistant .draft') && "
                         "document.querySelector('.assistant .draft').textContent.length > 0 && "
                         f"window.draftLog.length >= {drafts_before_shot} && !document.querySelector('.assistant').dataset.finish")
        shot = await page.send("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        await page.until("document.querySelector('.assistant').dataset.finish")
        return await page.js("({drafts: window.draftLog, text: document.querySelector('.assistant .committed')"
                             ".textContent, draft: document.querySelector('.assistant .draft').textContent,"
                             " stats: document.querySelector('.assistant .stats').textContent})")


def test_the_chat_page_shows_the_canvas_resolving_then_the_committed_text(server, browser, tmp_path):
    shot = tmp_path / "resolving.png"
    seen = asyncio.run(chat_in_page(browser, server.base, shot))
    assert len(seen["drafts"]) > MAX_TOKENS // 8 and len(set(seen["drafts"])) > 2
    assert seen["draft"] == "" and "prompt tokens" in seen["stats"]
    client = server.client()
    expected = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "What is 2+2?"}],
        seed=SEED, max_tokens=MAX_TOKENS, extra_body={"max_denoising_steps": STEPS,
                                                      "chat_template_kwargs": {"enable_thinking": False}})
    assert seen["text"] == expected.choices[0].message.content
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CHAT_PAGE_SCREENSHOT"):
        shutil.copy(shot, os.environ["CHAT_PAGE_SCREENSHOT"])
