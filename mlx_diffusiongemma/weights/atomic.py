"""Writing an output directory safely: checked free space, a locked hidden partial
directory beside the target, moved into place only on success."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError, first_line
from .memory import gb

DISK_FULL = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e)
_LOCK_NAME = ".partial.lock"


class OutputExists(UserError):
    """The output directory holds files and overwriting was not allowed."""

def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the filesystem that holds (or would hold) `path`."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(out_dir: str | os.PathLike, needed_bytes: int) -> None:
    """Raise a UserError if the filesystem of `out_dir` has less than `needed_bytes` free."""
    free = free_bytes(out_dir)
    if free < needed_bytes:
        raise UserError(
            f"not enough disk space for {out_dir}: need {gb(needed_bytes)} GB, {gb(free)} GB free; "
            "free up space or choose another output directory"
        )



@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike, overwrite: bool = False, *, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `out_dir` and move it into place on success.

    An existing non-empty `out_dir` is refused unless `overwrite`. On any exception
    (Ctrl-C included) the temporary directory is deleted and the exception re-raised, with
    disk-full and file-size-limit errors turned into a UserError. With `needed_bytes`, free
    space is checked first. Partial directories left by killed earlier runs are removed.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    _refuse_existing(out_dir, overwrite)
    _make_parent(out_dir)
    _remove_abandoned_partials(out_dir)
    # The partial directory first: a place that cannot be written (read-only, no
    # permission, a pseudo filesystem showing 0 bytes free) is named as such, not as full.
    tmp, lock = _make_partial(out_dir)
    try:
        try:
            if needed_bytes:
                check_free_space(out_dir.parent, needed_bytes)
            yield tmp
        finally:
            _unlock(tmp, lock)
        _refuse_existing(out_dir, overwrite)
        _move_into_place(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        mapped = _disk_full_error(exc, out_dir, needed_bytes)
        if mapped is None:
            raise
        raise mapped from exc


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory; remove it or choose another path")
    empty = not any(out_dir.iterdir())
    if not empty and not overwrite:
        raise OutputExists(f"output directory {out_dir} is not empty; choose another path or allow overwriting it")
    # Replacing the current or home directory (or one holding them) would pull it from under the user.
    for precious in (Path(os.path.expanduser("~")).resolve(), Path.cwd().resolve()):
        if precious.is_relative_to(out_dir):
            raise UserError(
                f"refusing to replace {out_dir}: it contains {precious}; choose a dedicated output directory"
            )


def _make_parent(out_dir: Path) -> None:
    existing = next(p for p in out_dir.parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create {out_dir}: {existing} is a file, not a directory; choose another output directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create {out_dir.parent} ({e.strerror}); choose an output directory you can write to"
        ) from None


def _make_partial(out_dir: Path) -> tuple[Path, int]:
    """Create `.NAME.partial-<random>` beside out_dir, holding a lock that marks it in use."""
    while True:
        tmp = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(
                f"cannot write in {out_dir.parent} ({e.strerror}); choose an output directory you can write to"
            ) from None
    # Locked before it gets its visible name, so no other run ever sees an unlocked live
    # directory; where the filesystem has no flock nobody can take the lock, which is safe.
    fd = os.open(tmp / f"{_LOCK_NAME}.new", os.O_CREAT | os.O_RDWR, 0o600)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp / f"{_LOCK_NAME}.new", tmp / _LOCK_NAME)
    return tmp, fd


def _unlock(tmp: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp / _LOCK_NAME)
    with contextlib.suppress(OSError):
        os.close(fd)


def _remove_abandoned_partials(out_dir: Path) -> None:
    """Delete partial siblings whose writer died (their lock can be taken); leave live ones alone."""
    for candidate in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.partial-*"):
        lock_path = candidate / _LOCK_NAME
        if candidate.is_symlink() or not candidate.is_dir() or lock_path.is_symlink():
            continue
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except OSError:
            continue
        try:
            if _owner_is_gone(fd, lock_path):
                shutil.rmtree(candidate, ignore_errors=True)
        finally:
            os.close(fd)


def _owner_is_gone(fd: int, lock_path: Path) -> bool:
    # A finishing run unlinks its lock file before releasing the lock, so a lock we can
    # take whose file is still linked was left by a run that died.
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return os.stat(lock_path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not os.path.lexists(out_dir) or not any(out_dir.iterdir()):
        os.replace(tmp, out_dir)  # POSIX rename replaces an empty directory atomically
        return
    aside = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
    os.rename(out_dir, aside)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(aside, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _disk_full_error(exc: BaseException, out_dir: Path, needed_bytes: int | None) -> UserError | None:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        reason = os.strerror(exc.errno)
    elif isinstance(exc, RuntimeError) and str(exc).startswith("[write]"):
        reason = first_line(exc)  # mlx reports failed writes without an errno
    else:
        return None
    free = free_bytes(out_dir.parent)
    amount = f"{gb(needed_bytes - free)} GB" if needed_bytes and needed_bytes > free else "space"
    return UserError(f"ran out of disk space writing {out_dir} ({reason}); free {amount} or choose another output")


