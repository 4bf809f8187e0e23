"""Receive side of one (peer, channel): header frames posted ahead and a receiver thread.

A consumer *claims* messages in the order they were sent; claiming never blocks. The inbox's thread
waits for each claimed message's header frame, decodes it, posts every tensor receive at once and
waits for the CPU ones, so transfers run while the consumer computes. Gloo's receive handles cannot
be polled (`is_completed` stays false until someone waits), hence a thread that blocks on them
instead of the consumer.

NOTE: the thread waits only while a claimed message is outstanding, so a process whose consumers
have stopped claiming holds no blocked gloo wait; a thread blocked at interpreter exit aborts the
process, which is why rank processes end with `os._exit`.
"""

from __future__ import annotations

import pickle
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pipeserve.distributed.wire import (
    FRAME_BYTES,
    Channel,
    Frame,
    HeaderEntry,
    MessageKind,
    ProtocolError,
    align,
    decode_entries,
    inline_view,
    unpack_frame,
)
from pipeserve.distributed.work import P2PError, P2PTimeoutError, P2PWork

if TYPE_CHECKING:
    from pipeserve.distributed.coordinator import GroupCoordinator

HEADER_DEPTH = 2  # header frames kept posted ahead per (peer, channel)


class Incoming:
    """One claimed message: its header frame, then its tensors once the header has been read."""

    def __init__(
        self,
        frame_work: P2PWork | None,
        gather_group: GroupCoordinator | None,
        gather_keys: dict[str, bool] | None,
        into: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.frame_work = frame_work
        self.gather_group = gather_group
        self.gather_keys = gather_keys or {}
        self.into = into or {}  # key -> the consumer's buffer that receives that tensor
        self.done = threading.Event()  # set once header and CPU tensors are in (or on error)
        self.error: BaseException | None = None
        self.kind: MessageKind | None = None
        self.tensor_dict: dict[str, Any] = {}
        self.obj: Any = None
        self.device_works: list[P2PWork] = []  # waited by the consumer, on its own stream
        self.gathers: list[torch.Tensor] = []  # full buffers whose rows are all-gathered


class Inbox:
    def __init__(self, coord: GroupCoordinator, src: int, channel: Channel) -> None:
        self.coord = coord
        self.src = src  # rank in group
        self.channel = channel
        self.peer = coord.ranks[src]
        self.frames: deque[P2PWork] = deque()
        self.queue: deque[Incoming] = deque()  # claimed, not yet taken by the thread
        self.cond = threading.Condition()
        self.expected_seq = 0
        self.error: BaseException | None = None
        for _ in range(HEADER_DEPTH):
            self._post_frame()
        self.thread = threading.Thread(
            target=self._run,
            name=f"pipeserve-recv-{coord.name}-{self.peer}-{channel.name}",
            daemon=True,
        )
        self.thread.start()

    def _post_frame(self) -> None:
        buf = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        self.frames.append(
            self.coord.post_recv(
                buf, self.src, self.channel, self.channel.header_tag, "header", cpu=True
            )
        )

    def claim(
        self,
        gather_group: GroupCoordinator | None,
        gather_keys: dict[str, bool] | None,
        into: dict[str, torch.Tensor] | None = None,
    ) -> Incoming:
        incoming = Incoming(None, gather_group, gather_keys, into)
        with self.cond:
            if self.error is not None:
                incoming.error = self.error
                incoming.done.set()
            else:
                self.queue.append(incoming)
                self.cond.notify()
        return incoming

    def _run(self) -> None:
        if self.coord.device.type == "cuda":
            torch.cuda.set_device(self.coord.device)
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                incoming = self.queue.popleft()
            try:
                # NOTE: only this thread takes and re-posts frames (in order), off the consumer's path.
                incoming.frame_work = self.frames.popleft()
                self._post_frame()
                self._receive(incoming)
            except BaseException as e:
                self._fail(incoming, e)
                return
            incoming.done.set()

    def _fail(self, incoming: Incoming, error: BaseException) -> None:
        with self.cond:
            self.error = error
            failed = [incoming, *self.queue]
            self.queue.clear()
        for inc in failed:
            inc.error = error
            inc.done.set()

    def _receive(self, incoming: Incoming) -> None:
        buf = incoming.frame_work.buffer
        # NOTE: the header wait is bounded by the process-group timeout and by peer liveness (a dead
        # peer closes the connection); the consumer bounds its own wait separately.
        incoming.frame_work.wait(timeout=self.coord.header_timeout_s)
        frame, payload = read_header(self.coord, self.src, self.channel, buf, self.expected_seq)
        self.expected_seq += 1
        incoming.kind = frame.kind
        decoded = decode_message(frame.kind, payload, self.peer, self.channel)
        if frame.kind == MessageKind.OBJECT:
            incoming.obj = decoded
            return
        cpu_works = []
        for what, target, on_cpu in plan_receive(
            self.coord, self.src, self.channel, decoded, incoming, buf, frame
        ):
            work = self.coord.post_recv(
                target, self.src, self.channel, self.channel.data_tag, what, cpu=on_cpu
            )
            self.coord.count_received(self.src, self.channel, work.nbytes)
            (cpu_works if on_cpu else incoming.device_works).append(work)
        for w in cpu_works:
            w.wait()


def read_header(
    coord: GroupCoordinator, src: int, channel: Channel, frame_buf: torch.Tensor, expected_seq: int
) -> tuple[Frame, bytes]:
    """Checks an arrived header frame and receives its tail, if any; returns the frame and header."""
    peer = coord.ranks[src]
    try:
        frame = unpack_frame(frame_buf)
    except (ProtocolError, ValueError) as e:
        raise P2PError(f"malformed header from rank {peer} on channel {channel.name}: {e}") from e
    if frame.channel != channel or frame.seq != expected_seq:
        raise P2PError(
            f"protocol desync with rank {peer}: expected message {expected_seq} on channel "
            f"{channel.name}, got message {frame.seq} on channel {frame.channel}"
        )
    payload = frame.head
    if frame.tail_len:
        tail = torch.empty(frame.tail_len, dtype=torch.uint8)
        coord.post_recv(tail, src, channel, channel.data_tag, "header tail", cpu=True).wait()
        payload += tail.numpy().tobytes()
    coord.count_received(src, channel, frame.header_len, header=True)
    return frame, payload


def decode_message(kind: MessageKind, payload: bytes, peer: int, channel: Channel) -> Any:
    """An object message's object, or a tensor dict's header entries."""
    try:
        return pickle.loads(payload) if kind == MessageKind.OBJECT else decode_entries(payload)
    except (ProtocolError, pickle.UnpicklingError, ValueError, KeyError, TypeError, EOFError) as e:
        raise P2PError(f"malformed header from rank {peer} on channel {channel.name}: {e}") from e


def plan_receive(
    coord: GroupCoordinator,
    src: int,
    channel: Channel,
    entries: list[HeaderEntry],
    incoming: Incoming,
    frame_buf: torch.Tensor,
    frame: Frame,
) -> list[tuple[str, torch.Tensor, bool]]:
    """Fills `incoming.tensor_dict` (inline tensors view the frame) and returns the receives still
    to post, as (what, buffer, on CPU) in wire order. Checks that both sides agree on every split."""
    group = incoming.gather_group
    offset = frame.inline_offset
    targets = []
    for e in entries:
        if e.meta is None:
            incoming.tensor_dict[e.key] = e.value
            continue
        split = coord.should_split(e.key, e.meta.numel, group, incoming.gather_keys)
        if split != e.split:
            raise P2PError(
                f"tensor {e.key!r} from rank {coord.ranks[src]} on channel {channel.name}: sender split="
                f"{e.split}, receiver split={split} (all_gather_group or all_gather_tensors differ)"
            )
        view = None
        if e.inline:  # the bytes (this rank's row when split) sit in the frame
            numel = e.meta.numel // group.world_size if split else e.meta.numel
            nbytes = numel * e.meta.dtype.itemsize
            view = inline_view(frame_buf, offset, nbytes, e.meta.dtype)
            offset += align(nbytes)
            coord.count_received(src, channel, nbytes)
            if not split:  # used in place: nothing to allocate or copy
                incoming.tensor_dict[e.key] = view.view(e.meta.shape)
                continue
        on_cpu = e.meta.device_type == "cpu"
        full = receive_buffer(incoming.into.get(e.key), e, "cpu" if on_cpu else coord.device)
        target = full.view(-1)
        if split:
            target = target.view(group.world_size, -1)[group.rank_in_group]
            incoming.gathers.append(full)
        if view is not None:
            target.copy_(view)
        elif e.meta.numel:
            targets.append((f"tensor {e.key!r}", target, on_cpu))
        incoming.tensor_dict[e.key] = full
    return targets


def receive_buffer(into: torch.Tensor | None, e: HeaderEntry, device: Any) -> torch.Tensor:
    """Where tensor `e` lands: a fresh buffer, or the front of the consumer's `into` buffer (the
    consumer keeps it from being reused while a previous message in it is still read)."""
    if into is None:
        return torch.empty(e.meta.shape, dtype=e.meta.dtype, device=device)
    if (
        into.dtype != e.meta.dtype
        or into.device != torch.device(device)
        or into.numel() < e.meta.numel
    ):
        raise P2PError(
            f"tensor {e.key!r} ({e.meta.dtype}, {tuple(e.meta.shape)}) does not fit its receive "
            f"buffer ({into.dtype}, {tuple(into.shape)} on {into.device})"
        )
    return into.view(-1)[: e.meta.numel].view(e.meta.shape)


class MessageWork:
    """The handle of one incoming message; the inbox's thread does the receiving."""

    def __init__(self, inbox: Inbox, incoming: Incoming) -> None:
        self.inbox = inbox
        self.incoming = incoming

    def is_completed(self) -> bool:
        return self.incoming.done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        timeout_s = self.inbox.coord.timeout_s if timeout is None else timeout
        if not self.incoming.done.wait(timeout_s):
            raise P2PTimeoutError(
                f"receive of a message from rank {self.inbox.peer} on channel {self.inbox.channel.name} "
                f"did not complete within {timeout_s:.1f}s"
            )
        error = self.incoming.error
        if error is not None:
            if isinstance(error, P2PError):
                raise type(error)(str(error)) from error
            raise P2PError(
                f"receive from rank {self.inbox.peer} on channel {self.inbox.channel.name} failed: {error}"
            ) from error
        for w in self.incoming.device_works:
            w.wait(timeout)


def make_postprocess(incoming: Incoming) -> Callable[[], dict[str, Any]]:
    def postprocess() -> dict[str, Any]:
        if not incoming.done.is_set() or incoming.error is not None:
            raise RuntimeError("postprocess() called before every handle of the message was waited")
        for full in incoming.gathers:
            incoming.gather_group.all_gather_rows(full)
        incoming.gathers.clear()
        return incoming.tensor_dict

    return postprocess
