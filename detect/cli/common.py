"""Shared plumbing of the command-line tools: one-line errors and exit codes."""

from __future__ import annotations

import sys
from typing import Callable

from detect.errors import DetectError


def run_cli(body: Callable[[], int]) -> int:
    """Run a tool's body; a DetectError becomes one line on stderr and exit code 2."""
    try:
        return body()
    except DetectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
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
