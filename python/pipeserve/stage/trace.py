"""A Chrome/Perfetto trace of the pipeline (`--pp-trace PATH`, or PIPESERVE_TRACE): per stage, a
host track (schedule, send, receive-wait, post-process) and a device track (forward), one span per
microbatch. Each rank writes PATH.rank<N>.json when its loop ends; rank 0 merges them into PATH."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import torch


class Tracer:
    def __init__(
        self, path: str, rank: int, stage: int, tp_rank: int, device: torch.device
    ) -> None:
        self.path, self.rank, self.stage, self.tp_rank = path, rank, stage, tp_rank
        self.events: list[dict] = []
        self.device_spans: list[tuple[str, int, Any, Any]] = []
        self.cuda = device.type == "cuda"
        if self.cuda:  # device times are placed relative to this event's host time
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
            torch.cuda.synchronize(device)
        self.origin_us = time.time() * 1e6

    @contextlib.contextmanager
    def span(self, name: str, mb_id: int) -> Iterator[None]:
        start = time.time() * 1e6
        try:
            yield
        finally:
            self._add(name, mb_id, start, time.time() * 1e6 - start, "host")

    def device_span(self, name: str, mb_id: int, begin: Any, end: Any) -> None:
        """CUDA events (read when the trace is written) or host seconds (CPU)."""
        if self.cuda:
            self.device_spans.append((name, mb_id, begin, end))
        else:
            self._add(name, mb_id, begin * 1e6, (end - begin) * 1e6, "device")

    def _add(self, name: str, mb_id: int, ts: float, dur: float, track: str) -> None:
        tid = self.tp_rank * 2 + (track == "device")
        args = {"mb": mb_id, "rank": self.rank}
        event = {"name": name, "ph": "X", "ts": ts, "dur": dur, "pid": self.stage, "tid": tid}
        self.events.append({**event, "args": args})

    def write(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for name, mb_id, begin, end in self.device_spans:
                ts = self.origin_us + self.origin.elapsed_time(begin) * 1e3
                self._add(name, mb_id, ts, begin.elapsed_time(end) * 1e3, "device")
        names = [
            {"name": "process_name", "ph": "M", "pid": self.stage,
             "args": {"name": f"stage {self.stage}"}},
            {"name": "thread_name", "ph": "M", "pid": self.stage, "tid": self.tp_rank * 2,
             "args": {"name": f"tp{self.tp_rank} host"}},
            {"name": "thread_name", "ph": "M", "pid": self.stage, "tid": self.tp_rank * 2 + 1,
             "args": {"name": f"tp{self.tp_rank} device"}},
        ]  # fmt: skip
        with open(f"{self.path}.rank{self.rank}.json", "w") as f:
            json.dump(names + self.events, f)


def merge_traces(path: str, world_size: int, wait_s: float = 5.0) -> None:
    """Rank 0, after the ring has shut down: every rank's part into one trace file at `path`."""
    deadline = time.monotonic() + wait_s
    parts = sorted(glob.glob(f"{path}.rank*.json"))
    while len(parts) < world_size and time.monotonic() < deadline:
        time.sleep(0.1)
        parts = sorted(glob.glob(f"{path}.rank*.json"))
    events: list[dict] = []
    for part in parts:
        with contextlib.suppress(OSError, ValueError), open(part) as f:
            events.extend(json.load(f))
        os.unlink(part)
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


class NullTracer:
    """Tracing off: the same calls, doing nothing."""

    @contextlib.contextmanager
    def span(self, name: str, mb_id: int) -> Iterator[None]:
        yield

    def device_span(self, name: str, mb_id: int, begin: Any, end: Any) -> None:
        pass

    def write(self) -> None:
        pass
