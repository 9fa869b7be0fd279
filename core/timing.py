"""Timing callables for the benchmark scripts: CUDA events on a GPU, perf_counter on a CPU.

CUDA kernels run asynchronously, so wall-clock timers around a launch measure
the launch, not the work; events recorded on the stream around the call and
synchronised afterwards measure the work. Scripts take medians of the list.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class Timer:
    """Seconds per call of a callable, one entry per timed repeat (after untimed warm-up calls)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], None], warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return times

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
