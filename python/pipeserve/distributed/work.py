"""P2P work handles: each keeps the buffer it moves alive until it has been waited on."""

from __future__ import annotations

import datetime
import threading
from typing import Any, NamedTuple

import torch

from pipeserve.distributed.wire import Channel


class P2PError(RuntimeError):
    """A transfer failed: the message names the peer, the channel and what was expected."""


class P2PTimeoutError(P2PError, TimeoutError):
    """A bounded wait ran out."""


class Endpoint(NamedTuple):
    """What a handle moves and with whom, for error messages (a tuple: one is built per post)."""

    peer: int  # global rank of the other side
    channel: Channel
    what: str  # e.g. "header", "tensor 'hidden_states'"
    direction: str  # "send" or "receive"

    def describe(self) -> str:
        prep = "to" if self.direction == "send" else "from"
        return f"{self.direction} of {self.what} {prep} rank {self.peer} on channel {self.channel.name}"


def raise_p2p_error(endpoint: Endpoint, timeout_s: float, cause: BaseException) -> None:
    text = str(cause)
    if "Timed out" in text or "timeout" in text.lower():
        raise P2PTimeoutError(
            f"{endpoint.describe()} did not complete within {timeout_s:.1f}s ({text.splitlines()[0]})"
        ) from cause
    raise P2PError(f"{endpoint.describe()} failed: {text.splitlines()[0]}") from cause


class P2PWork:
    """One posted isend/irecv. Holds `buffer` until `wait` returns, so it cannot be freed in flight."""

    def __init__(
        self,
        work: Any,
        buffer: torch.Tensor,
        endpoint: Endpoint,
        timeout_s: float,
    ) -> None:
        self._work = work
        self._buffer: torch.Tensor | None = buffer
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.nbytes = buffer.nbytes
        self._done = False

    @property
    def buffer(self) -> torch.Tensor | None:
        return self._buffer

    def is_completed(self) -> bool:
        return self._done or bool(self._work.is_completed())

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        timeout_s = self.timeout_s if timeout is None else timeout
        try:
            if self._buffer is not None and not self._buffer.is_cpu:
                # NOTE: a device work's wait() orders the current stream after the transfer and does
                # not block the host; the NCCL watchdog (process-group timeout) bounds it.
                self._work.wait()
            else:
                self._work.wait(datetime.timedelta(seconds=timeout_s))
        except P2PError:
            raise
        except RuntimeError as e:
            raise_p2p_error(self.endpoint, timeout_s, e)
        self._done = True
        self._buffer = None


class Latch:
    """A flag that is set once and waited on, like `threading.Event` but one lock instead of a
    condition: cheaper to make and to wake from, and a message makes one.

    NOTE: `set` is called once per latch (a second call raises RuntimeError, releasing an unlocked
    lock); whoever finishes a claimed message sets its latch, and only one party finishes it.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held until set
        self._set = False

    def set(self) -> None:
        self._set = True
        self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """True once set; False if `timeout` seconds pass first (None waits without bound)."""
        if self._set:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._lock.release()  # let later waits through
            return True
        return self._set
