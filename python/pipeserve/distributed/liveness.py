"""Peer liveness by heartbeats, so that a wait is bounded by its peers being alive, not by how long
their compute takes: a live peer computing for minutes is never an error, a frozen or vanished one
is (a dead one is usually caught sooner, when its connections close).

Every rank bumps a counter in the rendezvous store from a thread; a waiter whose wait runs past a
slice asks whether every peer has bumped within `timeout_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from pipeserve.distributed.work import P2PError, P2PTimeoutError

KEY = "pipeserve/heartbeat/{}"


class Liveness:
    def __init__(self, store: Any, rank: int, timeout_s: float, interval_s: float = 1.0) -> None:
        self.store, self.rank = store, rank
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.seen: dict[int, tuple[int, float]] = {}  # rank -> (counter, when it last changed)
        self.stop = threading.Event()
        self.store.add(KEY.format(rank), 1)
        threading.Thread(target=self._beat, name="pipeserve-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.store.add(KEY.format(self.rank), 1)
            except Exception:  # the store's host is gone; the waiters will notice
                return

    def check(self, ranks: Iterable[int]) -> None:
        """Raises P2PTimeoutError naming the first of `ranks` silent for over `timeout_s`."""
        now = time.monotonic()
        for rank in ranks:
            if rank == self.rank:
                continue
            try:
                count = self.store.add(KEY.format(rank), 0)
            except Exception as e:  # any store failure means rank 0 is gone
                raise P2PError(f"cannot read rank {rank}'s heartbeat: {e}") from e
            last, since = self.seen.get(rank, (None, now))
            if count != last:
                self.seen[rank] = (count, now)
            elif now - since > self.timeout_s:
                raise P2PTimeoutError(
                    f"rank {rank} has sent no heartbeat for {now - since:.1f}s "
                    f"(limit {self.timeout_s:g}s, --p2p-timeout): it is frozen or gone"
                )


def wait_live(
    wait: Callable[[float], Any], liveness: Liveness | None, peers: Iterable[int], slice_s: float
) -> Any:
    """`wait(slice_s)` until it returns, for as long as every peer is alive. `wait` must be
    repeatable after a P2PTimeoutError (a message handle's wait is)."""
    peers = list(peers)
    while True:
        try:
            return wait(slice_s)
        except P2PTimeoutError:
            if liveness is None:
                raise
            liveness.check(peers)
