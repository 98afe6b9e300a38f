"""Atomic file writes (a temp file in the same directory, fsync, then rename) and folder locks.

A killed process leaves either the old file or the new one, never half of one; what it may leave
is its temp file, ``.<name>.<pid>.<random>.tmp``, which :func:`remove_stale_temp_files` deletes
once that pid is gone. :class:`FileLock` is an exclusive lock that a dead holder cannot keep.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to ``path``; on clean exit it replaces ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's pid in the name tells a later run whether the writer is still alive.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if _unnamed(exc):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    binary = "b" in mode
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and _unnamed(exc):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _unnamed(exc: OSError) -> bool:
    """A failed write (disk full, EFBIG) names no file and mkstemp names the temp one: name the target instead."""
    return exc.errno is not None and (exc.filename is None or str(exc.filename).endswith(".tmp"))


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb", encoding=None) as handle:
        handle.write(data)


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | Path, error: type[Exception], what: str = "file"):
    """Parse a JSON file; a missing file or bad JSON raises ``error`` naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


# --------------------------------------------------------------------------- stale temp files

# ".<name>.<pid>.<mkstemp's 8 random characters>.tmp"; before the pid was added: ".<name>.<random>.tmp".
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def remove_stale_temp_files(directory: str | Path, *, locked: bool = False) -> list[Path]:
    """Delete the temp files that killed :func:`atomic_open` writers left in ``directory``.

    A file whose writer pid is gone is deleted; one of a live process is kept. A name without a pid
    (written by versions before the pid was added) is deleted only when ``locked`` says the caller
    holds the folder's lock, so that no writer of those versions can be at work there. Returns the
    removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        match = _TEMP.match(path.name)
        if match is None or not path.is_file():
            continue
        pid = match.group("pid")
        if (locked if pid is None else not _pid_alive(int(pid))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- locks

_HELD: dict[str, list] = {}   # resolved lock path -> [owner pid, depth, open handle]
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class FileLock:
    """An exclusive, non-blocking lock on ``path`` held by this process (re-entrant within it).

    A POSIX record lock (``fcntl.lockf``), not ``flock``: it belongs to the process, so the
    kernel drops it the moment the holder dies, even while children forked from it (DataLoader
    workers) still hold the file open. The file stays; it names the holder (pid, host, start
    time) for the refusal message and is emptied on release, so a non-empty file found when
    taking the lock names a holder that died.

    Args:
        path: the lock file (created).
        error: exception type raised when another process holds the lock.
        what: what is locked, for the message ("output folder runs/x").
    """

    def __init__(self, path: str | Path, *, error: type[Exception] = OSError, what: str = "") -> None:
        self.path = Path(path)
        self.error = error
        self.what = what or str(self.path)
        self.stale_holder = ""   # set by acquire(): the dead holder whose lock was taken over
        self.unsupported = ""    # set by acquire(): why the file system cannot lock (then nothing is refused)

    def acquire(self) -> "FileLock":
        key = str(self.path.resolve())
        held = _HELD.get(key)
        if held is not None and held[0] == os.getpid():
            held[1] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:   # a file system without POSIX locks: carry on, unprotected
                self.unsupported = exc.strerror or str(exc)
            else:
                handle.close()
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                holder = _read_holder(self.path)
                raise self.error(f"{self.what} is in use by another process ({holder or 'holder unknown'}; "
                                 f"lock file {self.path})") from None
        handle.seek(0)
        self.stale_holder = handle.read().strip()
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        handle.flush()
        _HELD[key] = [os.getpid(), 1, handle]
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        held = _HELD.get(key)
        if held is None or held[0] != os.getpid():
            return
        held[1] -= 1
        if held[1] == 0:
            handle = held[2]
            handle.seek(0)
            handle.truncate()   # an empty file: released cleanly
            handle.close()      # closing drops the lock
            del _HELD[key]

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()[:200]
    except OSError:
        return ""


def save_figure(fig, path: str | Path, *, dpi: int = 80) -> Path:
    """Write a matplotlib figure as a PNG, atomically, and close it; returns the path."""
    import matplotlib.pyplot as plt   # matplotlib only for the reports and plots, not for `import detect`

    path = Path(path)
    with atomic_open(path, "wb", encoding=None) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    plt.close(fig)
    return path

