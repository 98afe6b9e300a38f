"""Per-stage timing for predict(): the speed lines of tools/test.py and the ladder."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

_clock: Callable[[], float] = time.perf_counter


@contextmanager
def use_clock(clock: Callable[[], float]) -> Iterator[None]:
    """Make every :class:`StageClock` created inside the block read ``clock`` (e.g. ``time.process_time``)."""
    global _clock
    saved, _clock = _clock, clock
    try:
        yield
    finally:
        _clock = saved


class StageClock:
    """Adds elapsed seconds per stage into a dict (no-op without one); synchronises CUDA first.

    Wall-clock seconds by default; :func:`use_clock` swaps the clock (the ladder's CPU-time mode).
    """

    def __init__(self, timings: dict | None, device: torch.device | None) -> None:
        self.timings = timings
        self.cuda = device is not None and device.type == "cuda"
        self.clock = _clock
        self.start = self.clock()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = self.clock()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.start
        self.start = now
