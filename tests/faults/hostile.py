"""Hostile files and faulty machines for the fault tests: decompression bombs, flipped bytes, forked
children under a file-size limit, and children killed with SIGKILL at random moments.

Children are forked from the test process (it has imported torch already), so a trial costs
milliseconds instead of a fresh interpreter's seconds; each child runs single-threaded.
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit all-black PNG declaring ``width x height`` pixels: tens of KB on disk, gigabytes decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)          # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte of a file in place (``offset`` < 0 counts from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int) -> None:
    """Cut a file to its first ``keep`` bytes (``keep`` < 0: drop that many from the end)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def temp_files(root: Path) -> list[Path]:
    """Temp files of atomic writes (``.<name>.<random>.tmp``) anywhere under ``root``."""
    return sorted(p for p in root.rglob(".*.tmp"))


def _single_thread() -> None:
    """A forked child must not use the parent's thread pools (they did not survive the fork).

    The environment variable too: the tools size their pool themselves (detect.utils.runtime), from it.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _child(body: Callable[[], int], stderr_fd: int, file_limit: int | None) -> None:
    code = 70
    try:
        os.dup2(stderr_fd, 2)                 # a pipe: the file-size limit does not apply to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        sys.stdout = open(os.devnull, "w")
        _single_thread()
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
        code = int(body() or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_forked(body: Callable[[], int], *, file_limit: int | None = None,
               timeout: float = 120.0) -> tuple[int, list[str]]:
    """Run ``body`` in a forked child (optionally under ``RLIMIT_FSIZE``); returns (exit code, stderr lines)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(body, write_end, file_limit)
    os.close(write_end)
    os.set_blocking(read_end, False)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child did not finish in {timeout} s (hung?)")
        time.sleep(0.01)
    os.set_blocking(read_end, True)
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    text = b"".join(chunks).decode("utf-8", "replace")
    return os.waitstatus_to_exitcode(status), [line for line in text.splitlines() if line.strip()]


def kill_at(body: Callable[[], int], delay: float, *, ready: Callable[[], bool] | None = None,
            timeout: float = 60.0) -> bool:
    """Fork a child running ``body``; SIGKILL it ``delay`` seconds after it starts (after ``ready()``
    turns true when given). Returns whether the child died of a SIGKILL (ours, or its own)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _single_thread()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            code = int(body() or 0)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    start = time.monotonic()
    deadline = start + timeout
    while ready is not None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    fire = time.monotonic() + delay
    while time.monotonic() < fire:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL   # it may kill itself
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def kill_self_on(module, name: str, *, when=lambda *args, **kwargs: True, call: int = 1) -> None:
    """Replace ``module.name`` so that the ``call``-th call for which ``when(*args)`` holds SIGKILLs the
    process instead of running (e.g. ``os.replace`` of an atomic write: its temp file is left behind)."""
    original = getattr(module, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            count["n"] += 1
            if count["n"] == call:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def tiny_checkpoint(path: Path, class_names: list[str]) -> Path:
    """An untrained tiny Faster R-CNN at 64 px: what the tools need to run (not to be right)."""
    import torch

    from detect import build_model
    from detect.checkpoint import save_checkpoint
    from detect.config import config_to_dict, load_config

    config = Path(__file__).resolve().parents[2] / "configs" / "faster_rcnn" / "tiny_synthetic.yaml"
    cfg = load_config(config, [f"data.classes=[{','.join(class_names)}]", "model.input.min_size=[64]",
                               "model.input.test_min_size=64", "model.input.max_size=128", "train.workers=0"])
    torch.manual_seed(0)
    model = build_model(cfg, class_names=class_names)
    return save_checkpoint(path, model=model, config=config_to_dict(cfg), class_names=class_names)
