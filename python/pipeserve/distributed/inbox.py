"""Receive side of one (peer, channel): header frames posted ahead, messages resolved in order.

A receiver claims messages in the order they were sent. A claimed message is *resolved* once its
header frame has arrived: the header is decoded and every tensor receive is posted at once. Resolution
happens at the earliest progress point (the claim itself, `is_completed`, `wait`, any later claim), so
transfers start as soon as the header lands, not when the consumer gets round to waiting.
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pipeserve.distributed.wire import (
    FRAME_BYTES,
    Channel,
    HeaderEntry,
    MessageKind,
    ProtocolError,
    decode_entries,
    unpack_frame,
)
from pipeserve.distributed.work import Endpoint, P2PError, P2PWork

if TYPE_CHECKING:
    from pipeserve.distributed.coordinator import GroupCoordinator

HEADER_DEPTH = 2  # header frames kept posted ahead per (peer, channel)


class Incoming:
    """One claimed message: its header frame, then its tensors once resolved."""

    def __init__(self, frame_work: P2PWork, gather_group: GroupCoordinator | None, gather_keys: dict[str, bool] | None) -> None:
        self.frame_work = frame_work
        self.gather_group = gather_group
        self.gather_keys = gather_keys or {}
        self.resolved = False
        self.kind: MessageKind | None = None
        self.tensor_dict: dict[str, Any] = {}
        self.obj: Any = None
        self.works: list[P2PWork] = []
        self.gathers: list[tuple[str, torch.Tensor]] = []  # (key, full buffer) to all-gather


class Inbox:
    def __init__(self, coord: GroupCoordinator, src: int, channel: Channel) -> None:
        self.coord = coord
        self.src = src  # rank in group
        self.channel = channel
        self.peer = coord.ranks[src]
        self.frames: deque[P2PWork] = deque()
        self.pending: deque[Incoming] = deque()
        self.expected_seq = 0
        for _ in range(HEADER_DEPTH):
            self._post_frame()

    def _post_frame(self) -> None:
        buf = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        self.frames.append(
            self.coord.post_recv(buf, self.src, self.channel, self.channel.header_tag, "header", cpu=True)
        )

    def claim(self, gather_group: GroupCoordinator | None, gather_keys: dict[str, bool] | None) -> Incoming:
        incoming = Incoming(self.frames.popleft(), gather_group, gather_keys)
        self._post_frame()
        self.pending.append(incoming)
        self.progress()
        return incoming

    def progress(self) -> None:
        """Resolves, in order, every claimed message whose header frame has arrived."""
        while self.pending and self.pending[0].frame_work.is_completed():
            self._resolve(self.pending.popleft(), timeout=None)

    def resolve_through(self, incoming: Incoming, timeout: float | None) -> None:
        """Blocks (bounded) until `incoming` and every message claimed before it is resolved."""
        while not incoming.resolved:
            self._resolve(self.pending.popleft(), timeout)

    def _resolve(self, incoming: Incoming, timeout: float | None) -> None:
        buf = incoming.frame_work.buffer
        incoming.frame_work.wait(timeout)
        try:
            frame = unpack_frame(buf)
            self._check_frame(frame.channel, frame.seq)
            payload = frame.head + self._receive_tail(frame.tail_len, timeout)
            incoming.kind = frame.kind
            if frame.kind == MessageKind.OBJECT:
                incoming.obj = pickle.loads(payload)
            else:
                self._post_tensors(incoming, decode_entries(payload))
        except (ProtocolError, pickle.UnpicklingError, ValueError, KeyError, TypeError, EOFError) as e:
            raise P2PError(f"malformed header from rank {self.peer} on channel {self.channel.name}: {e}") from e
        self.coord.count_received(self.src, self.channel, FRAME_BYTES + frame.tail_len)
        incoming.resolved = True

    def _receive_tail(self, nbytes: int, timeout: float | None) -> bytes:
        if not nbytes:
            return b""
        tail = torch.empty(nbytes, dtype=torch.uint8)
        self.coord.post_recv(tail, self.src, self.channel, self.channel.data_tag, "header tail", cpu=True).wait(timeout)
        return tail.numpy().tobytes()

    def _check_frame(self, channel: int, seq: int) -> None:
        if channel != self.channel or seq != self.expected_seq:
            raise ProtocolError(
                f"protocol desync with rank {self.peer}: expected message {self.expected_seq} on channel "
                f"{self.channel.name}, got message {seq} on channel {channel}"
            )
        self.expected_seq += 1

    def _post_tensors(self, incoming: Incoming, entries: list[HeaderEntry]) -> None:
        coord = self.coord
        for e in entries:
            if e.meta is None:
                incoming.tensor_dict[e.key] = e.value
                continue
            split = coord.should_split(e.key, e.meta.numel, incoming.gather_group, incoming.gather_keys)
            if split != e.split:
                raise ProtocolError(
                    f"tensor {e.key!r}: sender split={e.split} but receiver decides split={split} "
                    "(all_gather_group sizes or all_gather_tensors differ between the two sides)"
                )
            on_cpu = e.meta.device_type == "cpu"
            full = torch.empty(e.meta.shape, dtype=e.meta.dtype, device="cpu" if on_cpu else coord.device)
            incoming.tensor_dict[e.key] = full
            if e.meta.numel == 0:
                continue
            target = full.view(-1)
            if split:
                group = incoming.gather_group
                target = target.view(group.world_size, -1)[group.rank_in_group]
                incoming.gathers.append((e.key, full))
            incoming.works.append(
                coord.post_recv(target, self.src, self.channel, self.channel.data_tag, f"tensor {e.key!r}", cpu=on_cpu)
            )
            coord.count_received(self.src, self.channel, target.numel() * target.element_size())


class MessageWork:
    """The handle of a whole incoming message: completes once its header and tensors have arrived."""

    def __init__(self, inbox: Inbox, incoming: Incoming) -> None:
        self.inbox = inbox
        self.incoming = incoming

    def is_completed(self) -> bool:
        self.inbox.progress()
        return self.incoming.resolved and all(w.is_completed() for w in self.incoming.works)

    def wait(self, timeout: float | None = None) -> None:
        self.inbox.resolve_through(self.incoming, timeout)
        for w in self.incoming.works:
            w.wait(timeout)


def make_postprocess(incoming: Incoming) -> Callable[[], dict[str, Any]]:
    def postprocess() -> dict[str, Any]:
        if not incoming.resolved or not all(w.is_completed() for w in incoming.works):
            raise RuntimeError("postprocess() called before every handle of the message was waited")
        for key, full in incoming.gathers:
            incoming.gather_group.all_gather_rows(full)
        incoming.gathers.clear()
        return incoming.tensor_dict

    return postprocess
