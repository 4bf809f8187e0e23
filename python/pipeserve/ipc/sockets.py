"""The ZeroMQ sockets between the front ends and stage 0. Each front end binds its own pair (its
requests out, its outputs in); stage 0 connects to every front end's pair, takes requests from all
of them fairly, and sends each front end only the outputs of the requests it owns."""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import zmq

from pipeserve.ipc.messages import StepOut, ToStage0, decode_output, decode_request, encode

logger = logging.getLogger("pipeserve.ipc")


@dataclass(frozen=True)
class IpcAddresses:
    """Per-instance socket paths, so that two engines or servers can run side by side."""

    base: str
    num_frontends: int = 1

    @classmethod
    def fresh(cls, num_frontends: int = 1) -> IpcAddresses:
        base = os.path.join(
            tempfile.gettempdir(), f"pipeserve-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        return cls(base, num_frontends)

    def requests(self, owner: int) -> str:
        return f"ipc://{self.base}-req{owner}"

    def outputs(self, owner: int) -> str:
        return f"ipc://{self.base}-out{owner}"

    def cleanup(self) -> None:
        for owner in range(self.num_frontends):
            for addr in (self.requests(owner), self.outputs(owner)):
                path = addr.removeprefix("ipc://")
                if os.path.exists(path):
                    os.unlink(path)


def queued(sock: zmq.Socket) -> Iterator[bytes]:
    """The messages `sock` holds now, without waiting (a socket's descriptor signals edges: a
    reader takes them all before it waits again). The socket's events are asked before each
    read, as the descriptor's contract wants, so that the last read raises no zmq.Again (an
    exception per reader wake-up)."""
    while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        try:
            yield sock.recv(zmq.NOBLOCK)
        except zmq.Again:  # another reader of the socket took it first
            return


class SchedulerSockets:
    """Stage 0's side: pulls requests from every front end, pushes each its own outputs."""

    def __init__(self, addrs: IpcAddresses) -> None:
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        for owner in range(addrs.num_frontends):
            self.pull.connect(addrs.requests(owner))
        self.push = []
        for owner in range(addrs.num_frontends):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(addrs.outputs(owner))
            self.push.append(push)

    @property
    def num_frontends(self) -> int:
        return len(self.push)

    def recv_all(self, timeout_s: float) -> list[ToStage0]:
        """Every queued request; waits up to `timeout_s` for the first one (0: does not wait). A
        message that does not decode is logged and dropped: a front end's bug is not this rank's."""
        msgs = []
        if self.pull.poll(int(timeout_s * 1000)):
            for data in queued(self.pull):
                try:
                    msgs.append(decode_request(data))
                except msgspec.DecodeError as e:
                    logger.error("dropped a malformed front-end message: %s", e)
        return msgs

    def send(self, owner: int, msg: StepOut) -> None:
        self.push[owner].send(encode(msg))


class FrontendSockets:
    """A front end's side: binds its pair, pushes requests, pulls outputs."""

    def __init__(self, addrs: IpcAddresses, owner: int = 0) -> None:
        ctx = zmq.Context.instance()
        self.owner = owner
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 0)  # queue every request rather than block the front end
        self.push.setsockopt(zmq.SNDTIMEO, 2000)  # a send that cannot go out raises zmq.Again
        self.push.bind(addrs.requests(owner))
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(addrs.outputs(owner))

    def send(self, msg: ToStage0) -> None:
        self.push.send(encode(msg))

    def recv(self, timeout_s: float) -> StepOut | None:
        if self.pull.poll(int(timeout_s * 1000)):
            return decode_output(self.pull.recv())
        return None

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)
