"""Shared plumbing of the command-line tools: one-line errors and exit codes, the CPU runtime flags."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from detect.config import TrainConfig
    from detect.utils.runtime import Runtime

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


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of threads >= 0 (0: automatic), got {text!r}")
    return value


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` and ``--no-flush-denormal``, applied by :func:`apply_runtime` (see detect.utils.runtime)."""
    group = parser.add_argument_group("CPU runtime")
    group.add_argument("--threads", type=_thread_count, default=None, metavar="N",
                       help="CPU threads of torch and OpenCV (default: train.threads where the tool has a config, "
                            "else 0 = automatic: the physical cores, shared among torchrun's processes)")
    group.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false", default=None,
                       help="keep denormal floats (default: flushed to zero, train.flush_denormal)")


def apply_runtime(args: argparse.Namespace, train: "TrainConfig | None" = None) -> "Runtime":
    """Set the threads and denormal mode from the flags of :func:`add_runtime_args`; call it first.

    With a training config the flags override ``train.threads`` / ``train.flush_denormal`` and are
    written into it, so the run's resolved ``config.yaml`` records what was used.
    """
    from detect.utils.runtime import setup_runtime

    threads, flush = getattr(args, "threads", None), getattr(args, "flush_denormal", None)
    if train is not None:
        train.threads = train.threads if threads is None else threads
        train.flush_denormal = train.flush_denormal if flush is None else flush
        threads, flush = train.threads, train.flush_denormal
    return setup_runtime(threads=threads or 0, flush_denormal=True if flush is None else flush)
