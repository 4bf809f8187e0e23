"""Receive side of one (peer, channel): header frames posted ahead and a receiver thread.

A consumer *claims* messages in the order they were sent; claiming never blocks. The inbox's thread
waits for each claimed message's header frame, decodes it, posts every tensor receive at once and
waits for the CPU ones, so transfers run while the consumer computes. Gloo's receive handles cannot
be polled (`is_completed` stays false until someone waits), hence a thread that blocks on them
instead of the consumer.

NOTE: the thread waits only while a claimed message is outstanding, so a process whose consumers
have stopped claiming holds no blocked gloo wait; a thread blocked at interpreter exit aborts the
process, which is why rank processes end with `os._exit`.

A claim whose blocking receive timed out is *abandoned*, not lost: the next claim on the inbox adopts
it (taking over its arguments while its header has not arrived), so a retry gets the message the
timed-out receive was waiting for. Consumers of one inbox claim from one thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pipeserve.distributed.frame import FRAME_BYTES
from pipeserve.distributed.receive import decode_message, plan_receive, read_header
from pipeserve.distributed.wire import Channel, MessageKind
from pipeserve.distributed.work import Latch, P2PError, P2PTimeoutError, P2PWork

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
        expected: MessageKind = MessageKind.TENSOR_DICT,
    ) -> None:
        self.frame_work = frame_work
        self.committed = False  # the thread has read the arguments below; they are fixed now
        self.set_arguments(gather_group, gather_keys, into, expected)
        self.done = Latch()  # set once header and CPU tensors are in (or on error)
        self.error: BaseException | None = None
        self.kind: MessageKind | None = None
        self.tensor_dict: dict[str, Any] = {}
        self.obj: Any = None
        self.device_works: list[P2PWork] = []  # waited by the consumer, on its own stream
        self.gathers: list[torch.Tensor] = []  # full buffers whose rows are all-gathered

    def set_arguments(
        self,
        gather_group: GroupCoordinator | None,
        gather_keys: dict[str, bool] | None,
        into: dict[str, torch.Tensor] | None,
        expected: MessageKind,
    ) -> None:
        self.gather_group = gather_group
        self.gather_keys = gather_keys or {}
        self.into = into or {}  # key -> the consumer's buffer that receives that tensor
        self.expected = expected


class Inbox:
    """Claims, the receiver thread and its failure handling; subclasses that speak another wire
    override `_post_ahead`, `_begin` and `_receive`."""

    def __init__(self, coord: GroupCoordinator, src: int, channel: Channel) -> None:
        self.coord = coord
        self.src = src  # rank in group
        self.channel = channel
        self.peer = coord.ranks[src]
        self.frames: deque[P2PWork] = deque()
        self.queue: deque[Incoming] = deque()  # claimed, not yet taken by the thread
        self.abandoned: deque[Incoming] = deque()  # claims whose receive timed out, oldest first
        self.cond = threading.Condition()
        self.expected_seq = 0
        self.error: BaseException | None = None
        self._post_ahead()
        self.thread = threading.Thread(
            target=self._run,
            name=f"pipeserve-recv-{coord.name}-{self.peer}-{channel.name}",
            daemon=True,
        )
        self.thread.start()

    def _post_ahead(self) -> None:
        for _ in range(HEADER_DEPTH):
            self._post_frame()

    def _begin(self, incoming: Incoming) -> None:
        """Gives `incoming` the oldest posted frame and posts the next one."""
        # NOTE: only this thread takes and re-posts frames (in order), off the consumer's path.
        incoming.frame_work = self.frames.popleft()
        self._post_frame()

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
        expected: MessageKind = MessageKind.TENSOR_DICT,
    ) -> Incoming:
        with self.cond:
            if self.abandoned:
                incoming = self.abandoned.popleft()
                if not incoming.committed:
                    incoming.set_arguments(gather_group, gather_keys, into, expected)
                return incoming
            incoming = Incoming(None, gather_group, gather_keys, into, expected)
            if self.error is not None:
                incoming.error = self.error
                incoming.done.set()
            else:
                self.queue.append(incoming)
                self.cond.notify()
        return incoming

    def abandon(self, incoming: Incoming) -> None:
        """A blocking receive of `incoming` timed out: its message goes to the next claim."""
        with self.cond:
            if self.queue and self.queue[-1] is incoming:
                self.queue.pop()  # the thread never started on it: nothing to hand over
            elif self.error is None:
                self.abandoned.append(incoming)

    def fail(self, error: BaseException, *failed: Incoming) -> None:
        """Marks the channel broken: `failed`, every claim still queued and every later claim fail
        with `error`."""
        with self.cond:
            if self.error is None:
                self.error = error
            failed = (*failed, *self.queue)
            self.queue.clear()
        for inc in failed:
            inc.error = error
            inc.done.set()

    def _run(self) -> None:
        if self.coord.device.type == "cuda":
            torch.cuda.set_device(self.coord.device)
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                incoming = self.queue.popleft()
            try:
                self._begin(incoming)
                self._receive(incoming)
            except BaseException as e:
                self.fail(e, incoming)
                return
            incoming.done.set()

    def _receive(self, incoming: Incoming) -> None:
        buf = incoming.frame_work.buffer
        # NOTE: the header wait is bounded by the process-group timeout and by peer liveness (a dead
        # peer closes the connection); the consumer bounds its own wait separately.
        incoming.frame_work.wait(timeout=self.coord.header_timeout_s)
        with self.cond:
            incoming.committed = True
        frame, payload = read_header(self.coord, self.src, self.channel, buf, self.expected_seq)
        self.expected_seq += 1
        incoming.kind = frame.kind
        check_kind(frame.kind, incoming.expected, self.peer, self.channel)
        decoded = decode_message(self.coord, frame.kind, payload, self.peer, self.channel)
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


def check_kind(kind: MessageKind, expected: MessageKind, peer: int, channel: Channel) -> None:
    if kind != expected:
        raise P2PError(
            f"rank {peer} sent a {kind.name} message on channel {channel.name} where a "
            f"{expected.name} was expected; the channel is broken"
        )


class MessageWork:
    """The handle of one incoming message; the inbox's thread does the receiving."""

    def __init__(
        self, inbox: Inbox, incoming: Incoming, expected: MessageKind = MessageKind.TENSOR_DICT
    ) -> None:
        self.inbox = inbox
        self.incoming = incoming
        self.expected = expected

    def abandon(self) -> None:
        self.inbox.abandon(self.incoming)

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
        try:  # an adopted claim may have asked for another kind than the one received
            check_kind(self.incoming.kind, self.expected, self.inbox.peer, self.inbox.channel)
        except P2PError as e:
            self.inbox.fail(e)
            raise
        for w in self.incoming.device_works:
            w.wait(timeout)


def _gather_rows(group: GroupCoordinator, full: torch.Tensor) -> None:
    group.all_gather_rows(full)


def make_postprocess(
    incoming: Incoming, gather: Callable[[Any, torch.Tensor], None] = _gather_rows
) -> Callable[[], dict[str, Any]]:
    """`gather(group, full)` fills in the rows of a TP-split tensor that other ranks received."""

    def postprocess() -> dict[str, Any]:
        if not incoming.done.is_set() or incoming.error is not None:
            raise RuntimeError("postprocess() called before every handle of the message was waited")
        for full in incoming.gathers:
            gather(incoming.gather_group, full)
        incoming.gathers.clear()
        return incoming.tensor_dict

    return postprocess
