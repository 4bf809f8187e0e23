"""Requests in flight to one endpoint: at most its `max_concurrency`, adapted by AIMD.

An overload answer (429 or 503) halves the current limit, once per round: refusals of requests
sent before the last cut do not cut again (TCP's once per window). With a `Retry-After` it also
holds new requests back until then;
each success adds `1 / limit`, so the limit grows by about one per round of successful requests
until it is back at the maximum. A fixed limit (`adaptive=False`) ignores both signals.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class AdaptiveLimit:
    def __init__(self, maximum: int, adaptive: bool = True) -> None:
        self.maximum = maximum
        self.limit = float(maximum)  # current; int(limit) requests may be in flight
        self.in_flight = 0
        self.lowest = maximum  # the lowest limit this run reached, for the summary
        self._adaptive = adaptive
        self._last_cut = -float("inf")  # time.monotonic() of the last cut
        self._hold_until = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Holds one request slot for the body of the `async with`."""
        await self._acquire()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wake()

    async def rejoin(self) -> None:
        """For the holder of a slot whose request was refused as overload: gives the slot up and
        waits for one under the (now lower) limit, so that a retry does not exceed it."""
        self.in_flight -= 1
        self._wake()
        await self._acquire()

    async def _acquire(self) -> None:
        while self.in_flight >= int(self.limit) or time.monotonic() < self._hold_until:
            if self.in_flight < int(self.limit):  # free, but held back by a Retry-After
                await asyncio.sleep(self._hold_until - time.monotonic())
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.in_flight += 1

    def succeeded(self) -> None:
        if self._adaptive and self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + 1 / self.limit)
            self._wake()

    def overloaded(self, retry_after_s: float | None, sent_at: float) -> None:
        """A request sent at `sent_at` (time.monotonic()) was refused as overload."""
        if not self._adaptive:
            return
        now = time.monotonic()
        if retry_after_s:
            self._hold_until = max(self._hold_until, now + retry_after_s)
        if sent_at >= self._last_cut:
            self._last_cut = now
            self.limit = max(1.0, self.limit / 2)
            self.lowest = min(self.lowest, int(self.limit))

    def _wake(self) -> None:
        """Lets waiters re-check, as many as there are free slots."""
        free = int(self.limit) - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
