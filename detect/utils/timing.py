"""Per-stage wall-clock timing for predict(): the speed lines of tools/test.py and the ladder."""

from __future__ import annotations

import time

import torch


class StageClock:
    """Adds elapsed seconds per stage into a dict (no-op without one); synchronises CUDA first."""

    def __init__(self, timings: dict | None, device: torch.device | None) -> None:
        self.timings = timings
        self.cuda = device is not None and device.type == "cuda"
        self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.start
        self.start = now
