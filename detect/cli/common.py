"""Shared plumbing of the command-line tools: one-line errors and exit codes."""

from __future__ import annotations

import errno
import sys
from typing import Callable

from detect.errors import DetectError
from detect.evaluation import METRIC_NAMES, format_ap  # noqa: F401  (the tools' tables)


# A full disk, a file-size limit, a read-only or forbidden folder: the machine's state, not a bug, so one
# line naming the file (files are written atomically: what was written before is intact).
_FILESYSTEM_ERRORS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file-size limit)", errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
}


def filesystem_error_line(exc: OSError) -> str | None:
    """The one line for a full disk / unwritable file, or None for other OSErrors (a bug: keep the traceback)."""
    what = _FILESYSTEM_ERRORS.get(exc.errno)
    if what is None:
        return None
    where = exc.filename if exc.filename is not None else "a file (name unknown)"
    return f"{where}: {what} (files written before are intact; free space or fix the folder, then rerun)"


def run_cli(body: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """Run a tool's body; a DetectError or a full/unwritable disk becomes one line on stderr and exit code 2."""
    try:
        return body()
    except DetectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        line = filesystem_error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def run_distributed_cli(run: Callable[[], object]) -> int:
    """:func:`run_cli` for tools that may run under torchrun: the process group is torn down whatever happens."""
    from detect import distributed

    def body() -> int:
        try:
            run()
        finally:
            distributed.cleanup()
        return 0

    return run_cli(body)
