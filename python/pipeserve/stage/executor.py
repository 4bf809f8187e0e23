"""Where a rank's forward runs: on CUDA the host only enqueues work, so it runs inline and the host
goes on at once; on CPU the forward holds its thread, so it runs on one worker thread (torch
releases the GIL in its ops) while the loop schedules the next microbatch and handles results.
One worker keeps forwards in launch order, which is what the token pool's future reads rely on."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


class Done:
    """An inline job's handle, already complete."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value

    def done(self) -> bool:
        return True


class Executor:
    def __init__(self, device: torch.device) -> None:
        self.pool = None
        if device.type == "cpu":
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="pipeserve-forward")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future | Done:
        if self.pool is None:
            return Done(fn(*args))
        return self.pool.submit(fn, *args)

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
