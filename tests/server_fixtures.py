"""A small chat model whose template renders Gemma 4 tool declarations, calls and
results, and a real `serve` process on a free localhost port, for the server tests and
benchmarks/server_bench.py."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import json
from pathlib import Path

from mlx_diffusiongemma.demos.sudoku.tokenizer import build_tokenizer
from reference import make_reference

CANVAS = 8
WINDOW = 16

# Gemma 4's grammar (see shared/reference/ecosystem.md): declarations in the system turn,
# calls as <|tool_call>call:NAME{...}<tool_call|>, strings between <|"|>, results as
# <|tool_response>response:NAME{...}<tool_response|>, thoughts stripped from history.
TOOLS_TEMPLATE = r"""
{%- macro gval(v) -%}
    {%- if v is string -%}{{- '<|"|>' ~ v ~ '<|"|>' -}}
    {%- elif v is mapping -%}
        {{- '{' -}}{%- for k, x in v.items() -%}{{- k ~ ':' -}}{{- gval(x) -}}{{- ',' if not loop.last -}}{%- endfor -%}{{- '}' -}}
    {%- elif v is sameas true -%}true{%- elif v is sameas false -%}false{%- elif v is none -%}null
    {%- elif v is iterable -%}
        {{- '[' -}}{%- for x in v -%}{{- gval(x) -}}{{- ',' if not loop.last -}}{%- endfor -%}{{- ']' -}}
    {%- else -%}{{- v -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro text(content) -%}
    {%- if content is string -%}{{- content | trim -}}
    {%- elif content -%}{%- for part in content -%}{{- part['text'] | trim -}}{%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro without_thoughts(t) -%}
    {%- set kept = namespace(text='') -%}
    {%- for piece in t.split('<channel|>') -%}{%- set kept.text = kept.text ~ piece.split('<|channel>')[0] -%}{%- endfor -%}
    {{- kept.text | trim -}}
{%- endmacro -%}
{%- set thinking = enable_thinking | default(false) -%}
{%- set has_system = messages | length > 0 and messages[0]['role'] in ['system', 'developer'] -%}
{{- bos_token -}}
{%- if thinking or has_system or tools -%}
    {{- '<|turn>system\n' -}}
    {%- if thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
    {%- if has_system -%}{{- text(messages[0]['content']) -}}{%- endif -%}
    {%- for t in tools or [] -%}
        {{- '<|tool>declaration:' ~ t['function']['name'] -}}
        {{- gval({'description': t['function'].get('description', ''), 'parameters': t['function'].get('parameters', {})}) -}}
        {{- '<tool|>' -}}
    {%- endfor -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- for m in messages[1 if has_system else 0:] -%}
    {%- if m['role'] == 'user' -%}
        {{- '<|turn>user\n' ~ text(m['content']) ~ '<turn|>\n' -}}
    {%- elif m['role'] == 'assistant' -%}
        {{- '<|turn>model\n' ~ without_thoughts(text(m['content'])) -}}
        {%- for c in m.get('tool_calls') or [] -%}
            {{- '<|tool_call>call:' ~ c['function']['name'] -}}{{- gval(c['function']['arguments']) -}}{{- '<tool_call|>' -}}
        {%- endfor -%}
        {{- '<turn|>\n' -}}
    {%- elif m['role'] == 'tool' -%}
        {{- '<|turn>model\n<|tool_response>response:' ~ m['name'] -}}{{- gval({'value': text(m['content'])}) -}}{{- '<tool_response|><turn|>\n' -}}
    {%- else -%}
        {{- raise_exception('Unsupported message role: ' ~ m['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
    {%- if not thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""


def tools_chat_model(path: Path) -> Path:
    """A random tiny model directory with a Gemma-4-style tokenizer and a tools template."""
    make_reference(path, seed=3, canvas_length=CANVAS, shard="50MB", vocab_size=512, sliding_window=WINDOW)
    build_tokenizer(path, vocab_size=512)
    (path / "chat_template.jinja").write_text(TOOLS_TEMPLATE.strip() + "\n", encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `mlx.launch` itself, run by this interpreter (its module has no __main__).
MLX_LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"


def launch_command(ranks: int, *command: str) -> list[str]:
    """`mlx.launch` of `command` on `ranks` ring ranks on 127.0.0.1."""
    return [sys.executable, "-c", MLX_LAUNCH, "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1",
            *command]


class ServerProcess:
    """`python -m mlx_diffusiongemma serve` as a subprocess (under `mlx.launch` when `ranks`
    > 1, in a process group of its own), stopped by `stop`."""

    def __init__(self, model: Path, log: Path, *args: str, env: dict | None = None, timeout: float = 180,
                 ranks: int = 1):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "wb")
        cmd = [sys.executable, "-m", "mlx_diffusiongemma", "serve", "--model", str(model),
               "--port", str(self.port), "--log-level", "warning", *args]
        if ranks > 1:
            cmd = launch_command(ranks, *cmd)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=ranks > 1)
        self.ranks = ranks
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                self.health()
                return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("the server did not answer /health in time")

    def client(self, timeout: float = 120):
        """The real `openai` client pointed at this server (no retries: a test sees every error)."""
        import openai

        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", timeout=timeout, max_retries=0)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.base}/health", timeout=10) as r:
            return json.loads(r.read())

    def stop(self, timeout: float = 15) -> int:
        """Stop the server (a launch as Ctrl-C stops it: SIGINT to every rank) and return
        its exit code; killed past `timeout`."""
        if self.proc.poll() is None:
            if self.ranks > 1:
                os.killpg(self.proc.pid, signal.SIGINT)
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.ranks > 1:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
