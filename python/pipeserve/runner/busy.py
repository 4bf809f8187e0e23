"""Time a rank spends computing, without making the host wait: on CUDA, event pairs read once they
have passed; on CPU, the wall time of each forward."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator

import torch


class BusyClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self.total_s = 0.0
        self.last: tuple = ()  # the latest forward's (begin, end): events, or host seconds

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter()
            try:
                yield
            finally:
                end = time.perf_counter()
                self.total_s += end - start
                self.last = (time.time() - (end - start), time.time())
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        try:
            yield
        finally:
            end.record()
            self.pending.append((begin, end))
            self.last = (begin, end)

    def seconds(self) -> float:
        """Busy seconds of every forward whose end the device has passed."""
        while self.pending and self.pending[0][1].query():
            begin, end = self.pending.popleft()
            self.total_s += begin.elapsed_time(end) / 1e3
        return self.total_s
