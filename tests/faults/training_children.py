"""Trainings in forked child processes, so a test can kill -9 them at a chosen moment.

A fork starts in milliseconds where a fresh interpreter spends seconds importing torch; the child
runs with one intra-op thread (no OpenMP pool is used after the fork, and every run of a
comparison does the same arithmetic). Children report progress through a pipe: one ``s`` byte
after every training iteration, ``w`` when a checkpoint write they were told to freeze is half done.
The hooks patch only torch and ``os`` (not the toolkit), so the same tests run on older versions.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

STEP, IN_WRITE = b"s", b"w"


def _warm_up() -> None:
    """Do the lazy imports once here, not in every child (the first optimizer imports torch._dynamo: seconds)."""
    import importlib

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    for name in ("detect.build", "detect.data.loader", "detect.engine", "detect.config", "detect.cli.train"):
        importlib.import_module(name)


class Child:
    """A forked process running ``target(report)``; ``report(byte)`` writes to the pipe."""

    def __init__(self, target: Callable[[Callable[[bytes], None]], int], *, log: Path) -> None:
        self.log = Path(log)
        _warm_up()
        read_fd, write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:   # the child: never returns into pytest
            code = 3
            try:
                os.close(read_fd)
                os.setpgid(0, 0)   # its own group, so its DataLoader workers can be reaped with it
                torch.set_num_threads(1)
                os.environ["OMP_NUM_THREADS"] = "1"   # what the tools' automatic thread count follows
                sys.stdout = sys.stderr = open(self.log, "w", buffering=1, encoding="utf-8")
                code = int(target(lambda byte: os.write(write_fd, byte)) or 0)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                os._exit(code)
        os.close(write_fd)
        self.pipe = read_fd
        self.seen = b""
        self.status: int | None = None

    def wait_for(self, byte: bytes, count: int = 1, timeout: float = 60.0) -> bool:
        """Read progress until ``count`` ``byte``s came; False when the child ended first."""
        deadline = time.monotonic() + timeout
        while self.seen.count(byte) < count:
            ready, _, _ = select.select([self.pipe], [], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise TimeoutError(f"child {self.pid}: no {byte!r} #{count} within {timeout} s; log: {self.text()}")
            chunk = os.read(self.pipe, 4096)
            if not chunk:
                return False
            self.seen += chunk
        return True

    def kill(self, *, group: bool = True) -> None:
        """SIGKILL the trainer, and its DataLoader workers unless ``group`` is False; reap the trainer."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL) if group else os.kill(self.pid, signal.SIGKILL)
        self.join()

    def group_alive(self) -> bool:
        """Whether a process of the child's group (an orphaned worker) still runs."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def join(self, timeout: float = 120.0) -> int:
        """Exit code (negative: killed by that signal)."""
        if self.status is None:
            deadline = time.monotonic() + timeout
            while True:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    self.kill(group=True)
                    raise TimeoutError(f"child {self.pid} ran over {timeout} s; log: {self.text()}")
                time.sleep(0.01)
            self.status = os.waitstatus_to_exitcode(status)
            os.close(self.pipe)
        return self.status

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""


def run(target: Callable, *, log: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``target`` in a child to the end: ``(exit code, its output)``."""
    child = Child(target, log=log)
    try:
        code = child.join(timeout)
    finally:
        child.kill()   # a worker left behind
    return code, child.text()


def mark_steps(report: Callable[[bytes], None]) -> None:
    """Report every training iteration (the loop calls ``zero_grad`` once per iteration; child only)."""
    zero_grad = torch.optim.Optimizer.zero_grad

    def reporting(self, *args, **kwargs):
        zero_grad(self, *args, **kwargs)
        report(STEP)

    torch.optim.Optimizer.zero_grad = reporting


def freeze_checkpoint_write(report: Callable[[bytes], None], number: int) -> None:
    """The ``number``-th checkpoint write (1-based) is cut to half its bytes, reports ``w`` and waits to be killed.

    It hooks ``os.fsync`` of the temp file, so the file is left as a writer killed mid-write leaves it.
    """
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith((".ckpt_", ".model_final.pt")):
            calls["n"] += 1
            if calls["n"] == number:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                report(IN_WRITE)
                time.sleep(600)
        return real_fsync(fd)

    os.fsync = fsync


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob(".*.tmp"))
