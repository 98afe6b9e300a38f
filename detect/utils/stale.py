"""Removing the temp files that killed writers left in a directory, without touching live writers' ones.

:func:`detect.utils.io.atomic_open` writes ``.<name>.<random>.tmp`` next to its target and renames it;
a process killed in between leaves the temp file behind (a feature shard is megabytes, a merged
proposal file much more). Every process that writes into such a directory holds a shared ``flock``
on the directory itself (the kernel drops it when the process dies, however it dies); a process that
gets it exclusively knows that no writer is alive, so every temp file there is stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class WritersLock:
    """This process's shared lock on a directory it writes into; released by :meth:`close` or at exit."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.removed: list[Path] = []
        self._fd: int | None = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass                                    # another writer is alive: its temp files may be in use
        else:
            for path in sorted(self.directory.glob(".*.tmp")):
                try:
                    path.unlink()
                    self.removed.append(path)
                except FileNotFoundError:
                    pass
        fcntl.flock(self._fd, fcntl.LOCK_SH)        # downgrade: other writers may join

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def join_writers(directory: str | Path) -> WritersLock:
    """Register as a writer of ``directory`` (created if missing); stale temp files are removed first
    when no other writer is alive (listed in the lock's ``removed``). Keep the lock while writing."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return WritersLock(directory)
