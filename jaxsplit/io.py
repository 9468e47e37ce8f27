"""Safe writes into run folders: atomic result files, stale temporaries, a lock per run folder.

* `atomic_write_bytes` / `atomic_write_text` / `atomic_write_json` / `atomic_writer`: the file
  is written to a temporary sibling (`.NAME.tmp-PID-TOKEN`, same directory, so the rename
  cannot cross file systems), flushed and fsync'ed, then `os.replace`d over `NAME` and the
  directory fsync'ed. A crash or a full disk leaves the old file (or none), never a truncated
  one.
* `remove_stale_temporaries(root)`: deletes what killed writers leave behind (`.*.tmp-*` files
  of the helpers above, orbax `.checkpoint.new-*` directories of `jaxsplit.checkpoint`). Only
  safe while holding the run folder's lock.
* `run_lock(run_dir, what)`: an exclusive `flock` on `run_dir/.jaxsplit.lock` while a stage
  writes the folder; a second writer gets `RunLockedError` naming the holder's pid and command.
  Re-entrant within one process (the demo holds it around stages that take it again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from jaxsplit.errors import RunLockedError

__all__ = ["atomic_writer", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "remove_stale_temporaries", "run_lock", "LOCK_NAME", "is_temporary"]

LOCK_NAME = ".jaxsplit.lock"
_TMP_MARK = ".tmp-"
_ORBAX_NEW_MARK = ".new-"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """`with atomic_writer(path) as f: f.write(...)`: `path` appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_writer(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented JSON (serialised before anything is written)."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """`write(f)` into a binary file that replaces `path` atomically (e.g. `np.savez`)."""
    with atomic_writer(path, "wb") as f:
        write(f)
    return Path(path)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of jaxsplit's temporaries (hidden, `.tmp-` or orbax `.new-`)."""
    return name.startswith(".") and (_TMP_MARK in name or _ORBAX_NEW_MARK in name)


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete the temporaries killed writers left under `root`; returns what was removed.

    Call it only while holding `run_lock(root)`: then no live writer owns them.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if is_temporary(name):
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                removed.append(Path(dirpath) / name)
                dirnames.remove(name)
        for name in filenames:
            if is_temporary(name):
                with contextlib.suppress(FileNotFoundError):
                    (Path(dirpath) / name).unlink()
                removed.append(Path(dirpath) / name)
    return removed


_HELD: dict[str, list] = {}  # resolved lock path -> [fd, depth]


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the run folder's lock while `what` (e.g. "jaxsplit modularize") writes it.

    Creates `run_dir` when needed (and removes it again on exit when the lock file is all it
    holds, so a stage refused early leaves nothing behind). Stale temporaries under `run_dir`
    are removed once the lock is taken.

    Raises:
      RunLockedError: another process holds it (the message names its pid and command).
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_NAME
    key = str(lock_path.resolve())
    if key in _HELD:  # re-entrant: this process already holds it
        _HELD[key][1] += 1
        try:
            yield lock_path
        finally:
            _HELD[key][1] -= 1
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        try:
            holder = lock_path.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise RunLockedError(
            f"run folder {str(run_dir)!r} is in use by another process ({holder}); wait for it "
            f"to finish or stop it, then run this command again") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {what}\n".encode())
        _HELD[key] = [fd, 1]
        remove_stale_temporaries(run_dir)
        yield lock_path
    finally:
        _HELD.pop(key, None)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        if created and sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]:
            lock_path.unlink()
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
