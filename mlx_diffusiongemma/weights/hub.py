"""Finding a model: a local directory or a Hugging Face Hub id (downloaded or cached)."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from pathlib import Path

from ..errors import UserError, first_line
from .atomic import DISK_FULL

RELEASE_REPO = "google/diffusiongemma-26B-A4B-it"
# What `generate` and `chat` load when no model is named (as mlx-lm defaults to a Hub model).
DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
_HUB_ID = re.compile(r"(?!.*(?:--|\.\.))\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?", re.ASCII)

def resolve_model_path(
    path_or_id: str | os.PathLike,
    allow_patterns: list[str] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Return the local model directory for a path, or download (or find cached) an `owner/name` Hub repo.

    Anything that looks like a local path is never sent to the Hub, so a typo gives
    "does not exist" instead of a confusing repo-id error.
    """
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise UserError(
            f"the model must be a directory path or a Hub id (owner/name), got {type(path_or_id).__name__}; "
            f"pass e.g. ./my-model or {RELEASE_REPO}"
        )
    text = os.fsdecode(path_or_id)
    if not text.strip():
        raise UserError("no model given (empty path); pass a model directory or a Hub id such as " + RELEASE_REPO)
    local = Path(os.path.expanduser(text))
    if not isinstance(path_or_id, str) or _exists(local) or _looks_local(text):
        return _existing_dir(local, text)
    if len(text) <= 96 and _HUB_ID.fullmatch(text):
        return _from_hub(text, allow_patterns, cache_dir)
    raise UserError(
        f"{text!r} is neither an existing directory nor a Hugging Face repo id (owner/name); "
        f"pass a model directory or an id such as {RELEASE_REPO}"
    )


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _looks_local(text: str) -> bool:
    if text.startswith((".", "~", "/")) or "\\" in text or text.count("/") > 1 or os.path.isabs(text):
        return True
    return any(_exists(parent) for parent in Path(text).parents if parent != Path("."))


def _existing_dir(local: Path, shown: str) -> Path:
    try:
        is_dir, exists = local.is_dir(), local.exists()
    except (OSError, ValueError):
        is_dir = exists = False
    if is_dir:
        return local
    if exists:
        raise UserError(
            f"{shown} is a file, not a model directory; pass the directory that contains it ({local.parent})"
        )
    raise UserError(f"model directory {shown} does not exist; check the path (a Hub id looks like owner/name)")


def _from_hub(repo_id: str, allow_patterns: list[str] | None, cache_dir: str | os.PathLike | None) -> Path:
    import huggingface_hub
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=allow_patterns, cache_dir=cache_dir, local_files_only=offline
        )
    except Exception as exc:
        mapped = _hub_error(repo_id, exc, offline)
        if mapped is None:
            raise
        raise mapped from exc
    return Path(folder)


def _hub_error(repo_id: str, exc: Exception, offline: bool) -> UserError | None:
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.IncompleteSnapshotError):
        return UserError(
            f"the cached copy of {repo_id} is incomplete and the Hub cannot be reached; "
            f"reconnect and run `hf download {repo_id}`"
        )
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return _not_cached_error(repo_id, offline)
    if isinstance(exc, hf.HfHubHTTPError):
        return _hub_http_error(repo_id, exc)
    if isinstance(exc, hf.HFValidationError):
        return UserError(f"{repo_id!r} is not a valid Hugging Face repo id ({first_line(exc)}); check the spelling")
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return UserError(
            f"ran out of disk space downloading {repo_id} into the Hugging Face cache; "
            "free space or set HF_HOME to a larger disk"
        )
    if isinstance(exc, (OSError, *_http_error_types())):
        return UserError(
            f"downloading {repo_id} failed ({type(exc).__name__}: {first_line(exc)}); "
            "check your network connection, or pass a local directory"
        )
    return None


def _not_cached_error(repo_id: str, offline: bool) -> UserError:
    if offline:
        return UserError(
            f"{repo_id} is not in the local Hugging Face cache and offline mode is on: "
            f"download it first (`hf download {repo_id}`) or pass a local directory"
        )
    return UserError(
        f"could not reach the Hugging Face Hub to download {repo_id}, and it is not in the local cache; "
        "check your network connection or pass a local directory"
    )


def _hub_http_error(repo_id: str, exc: Exception) -> UserError:
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.GatedRepoError):
        return UserError(
            f"{repo_id} is a gated repository: accept its license at https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login`"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return UserError(
            f"{repo_id} was not found on the Hugging Face Hub (or it is private); check the id, "
            "or log in with `hf auth login`"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return UserError(
            f"the Hugging Face Hub refused access to {repo_id} (HTTP {status}); log in with `hf auth login`"
        )
    return UserError(
        f"downloading {repo_id} from the Hugging Face Hub failed ({first_line(exc)}); "
        "retry later or pass a local directory"
    )


def _http_error_types() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client this huggingface_hub version uses."""
    types = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            types.append(importlib.import_module(module).HTTPError)
    return tuple(types)


