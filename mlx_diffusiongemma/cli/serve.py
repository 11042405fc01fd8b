"""`mlx-diffusiongemma serve`: an OpenAI-compatible HTTP server for one model."""

import ipaddress
from typing import Annotated

import typer

from ..server import API_KEY_ENV, ServerConfig
from .app import app, info
from .options import ModelOption


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    model: ModelOption = None,
    adapter_path: Annotated[str | None, typer.Option(
        help="LoRA adapter directory to apply to the model.", show_default="none")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback is reachable from other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    api_key: Annotated[str | None, typer.Option(
        envvar=API_KEY_ENV, help="Require `Authorization: Bearer KEY` on every endpoint but /health.",
        show_default="none")] = None,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests that may wait while one generates; more get 503.")] = 16,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body accepted (413 beyond).")] = 4 << 20,
    prompt_cache_size: Annotated[int, typer.Option(min=1, help="Encoder caches of recent prompts kept for reuse.")] = 4,
    prompt_cache_bytes: Annotated[int, typer.Option(min=0, help="Bytes those caches may hold together.")] = 2 << 30,
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="Leave the vision tower out (saves its memory; requests with images get 400).")] = False,
    allow_remote_images: Annotated[bool, typer.Option(
        "--allow-remote-images", help="Fetch http(s) image URLs in requests (by default only data: URLs are "
        "read; fetching lets clients make this machine request any address).")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
):
    """Serve the model over the OpenAI API: /v1/chat/completions, /v1/completions,
    /v1/models, /health, and a chat page at /.

    Point any OpenAI client at http://HOST:PORT/v1. One generation runs at a time;
    the others wait in a bounded queue.
    """
    from ..server import run
    from ..weights.hub import DEFAULT_MODEL

    if not _is_loopback(host) and not api_key:
        info(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
             f"(set --api-key or {API_KEY_ENV})")
    config = ServerConfig(model=model or DEFAULT_MODEL, adapter_path=adapter_path, api_key=api_key or None, max_queue=max_queue,
                          max_body_bytes=max_body_bytes, cache_entries=prompt_cache_size,
                          cache_bytes=prompt_cache_bytes, text_only=text_only,
                          allow_remote_images=allow_remote_images)
    info(f"loading {config.model} ...")
    run(config, host=host, port=port, log_level=log_level)
