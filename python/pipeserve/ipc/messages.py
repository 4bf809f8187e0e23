"""Typed messages between a front end (the offline Engine or the HTTP server) and stage 0's
scheduler, their codec, and the ZeroMQ sockets that carry them.

Requests go in once; outputs come back as per-step deltas. The codec turns a message into plain
values (tag, fields) and back; decoding builds nothing but the registered message types.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from pipeserve.distributed.wire import loads_plain


@dataclass(frozen=True)
class GenerateReq:
    rid: str
    input_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields, validated by the front end
    seed: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    priority: int = 0  # lower is admitted first


@dataclass(frozen=True)
class GenerateBatch:
    """Several requests in one message, so that the scheduler sees them arrive together (an offline
    batch is then prefilled in as few microbatches as the budget allows, not split by arrival)."""

    reqs: list[GenerateReq]


@dataclass(frozen=True)
class AbortReq:
    rid: str


@dataclass(frozen=True)
class ShutdownReq:
    pass


@dataclass(slots=True)  # not frozen: built hundreds of times a step, where frozen init is slow
class TokenOut:
    """New tokens of one request since its last TokenOut (all of them once it has finished)."""

    rid: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[list[float]]] | None = None  # per token: [[id, logprob], ...]
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    queue_time_s: float | None = None  # on a request's first token: seconds it waited at stage 0


@dataclass(frozen=True)
class StepOut:
    outputs: list[TokenOut] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


MESSAGES = {
    cls.__name__: cls
    for cls in (GenerateReq, GenerateBatch, AbortReq, ShutdownReq, TokenOut, StepOut)
}


# Field names per message type, looked up once: the codec runs for every output of every step.
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGES.values()}
_TAGS = {cls: "@" + cls.__name__ for cls in MESSAGES.values()}
_SCALARS = frozenset((int, float, str, bool, type(None)))


def _to_plain(obj: Any) -> Any:
    cls = type(obj)
    if cls in _SCALARS:
        return obj
    names = _FIELDS.get(cls)
    if names is not None:  # scalar fields as they are: no call per field (hundreds per step)
        values = [getattr(obj, n) for n in names]
        return (_TAGS[cls], [v if type(v) in _SCALARS else _to_plain(v) for v in values])
    if isinstance(obj, (list, tuple)):
        if _SCALARS.issuperset(map(type, obj)):  # token ids, logprobs: no walk (checked in C)
            return obj if cls is list else list(obj)
        return [_to_plain(x) for x in obj]
    return obj


def _from_plain(obj: Any) -> Any:
    cls = type(obj)
    if cls in _SCALARS:
        return obj
    if cls is tuple and len(obj) == 2 and isinstance(obj[0], str) and obj[0].startswith("@"):
        return MESSAGES[obj[0][1:]](*[x if type(x) in _SCALARS else _from_plain(x) for x in obj[1]])
    if cls is list:
        if _SCALARS.issuperset(map(type, obj)):
            return obj
        return [_from_plain(x) for x in obj]
    return obj


def encode(msg: Any) -> bytes:
    return pickle.dumps(_to_plain(msg), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Any:
    return _from_plain(loads_plain(data))


@dataclass(frozen=True)
class IpcAddresses:
    """Per-instance socket paths, so that two engines or servers can run side by side."""

    requests: str
    outputs: str

    @classmethod
    def fresh(cls) -> IpcAddresses:
        base = os.path.join(
            tempfile.gettempdir(), f"pipeserve-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        return cls(f"ipc://{base}-req", f"ipc://{base}-out")

    def cleanup(self) -> None:
        for addr in (self.requests, self.outputs):
            path = addr.removeprefix("ipc://")
            if os.path.exists(path):
                os.unlink(path)


class SchedulerSockets:
    """Stage 0's side: pulls requests, pushes outputs. The front end binds; stage 0 connects."""

    def __init__(self, addrs: IpcAddresses) -> None:
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.connect(addrs.requests)
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)
        self.push.connect(addrs.outputs)

    def recv_all(self, timeout_s: float) -> list[Any]:
        """Every queued request; waits up to `timeout_s` for the first one (0: does not wait)."""
        msgs = []
        if self.pull.poll(int(timeout_s * 1000)):
            while True:
                try:
                    msgs.append(decode(self.pull.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        return msgs

    def send(self, msg: Any) -> None:
        self.push.send(encode(msg))


class FrontendSockets:
    """The front end's side: binds both sockets, pushes requests, pulls outputs."""

    def __init__(self, addrs: IpcAddresses) -> None:
        ctx = zmq.Context.instance()
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 0)  # queue every request rather than block the front end
        self.push.setsockopt(zmq.SNDTIMEO, 2000)  # a send that cannot go out raises zmq.Again
        self.push.bind(addrs.requests)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(addrs.outputs)

    def send(self, msg: Any) -> None:
        self.push.send(encode(msg))

    def recv(self, timeout_s: float) -> Any | None:
        if self.pull.poll(int(timeout_s * 1000)):
            return decode(self.pull.recv())
        return None

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)
