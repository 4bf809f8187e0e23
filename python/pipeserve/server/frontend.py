"""The server's bridge to stage 0: submits typed requests over IPC, routes the per-step deltas back
to each request's queue, and watches the ranks (a dead rank fails every pending request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from pipeserve.engine.detokenizer import Detokenizer
from pipeserve.engine.ipc import (
    AbortReq,
    GenerateReq,
    IpcAddresses,
    ShutdownReq,
    TokenOut,
    decode,
    encode,
)
from pipeserve.engine.processes import RankFailure, RankGroup
from pipeserve.engine.request_state import RequestState
from pipeserve.engine.sampling_params import SamplingParams

logger = logging.getLogger("pipeserve.server")


class EngineDead(RuntimeError):
    """A rank died: nothing more will be answered."""


class QueueFull(RuntimeError):
    """More unfinished requests than --max-queued-requests."""


class OverBound(ValueError):
    """One HTTP request needs more engine requests than --max-queued-requests allows at all."""


@dataclass
class Counters:
    requests: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0, "aborted": 0})
    prompt_tokens: int = 0
    generation_tokens: int = 0
    started: float = field(default_factory=time.time)


class Frontend:
    def __init__(
        self,
        ranks: RankGroup,
        ipc: IpcAddresses,
        max_queued: int | None,
        detokenizer: Detokenizer | None = None,  # None: no tokenizer, token ids only
    ) -> None:
        self.ranks = ranks
        self.detokenizer = detokenizer
        ctx = zmq.asyncio.Context.instance()
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.bind(ipc.requests)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(ipc.outputs)
        self.max_queued = max_queued
        self.queues: dict[str, asyncio.Queue[TokenOut | BaseException]] = {}
        self.stats: dict[str, Any] = {}
        self.counters = Counters()
        self.dead: str | None = None
        self.on_dead: Callable[[str], None] | None = None  # the launcher stops the server
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._read_outputs()),
            asyncio.create_task(self._watch_ranks()),
        ]

    # ---- requests ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self, count: int) -> Iterator[list[str]]:
        """Request ids for all `count` engine requests of one HTTP request, each with its output
        queue, or QueueFull / OverBound before any of them starts: a request is admitted whole or
        not at all. Their queues are dropped on exit."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        if self.max_queued is not None and count > self.max_queued:
            raise OverBound(
                f"this request needs {count} sequences (prompts x n); the server's bound on "
                f"unfinished requests is {self.max_queued}"
            )
        if self.max_queued is not None and len(self.queues) + count > self.max_queued:
            raise QueueFull(
                f"{len(self.queues)} requests are unfinished; the server's bound is {self.max_queued}"
            )
        rids = [uuid.uuid4().hex for _ in range(count)]
        self.queues.update((rid, asyncio.Queue()) for rid in rids)
        try:
            yield rids
        finally:
            for rid in rids:
                self.queues.pop(rid, None)

    async def generate(
        self,
        rid: str,
        ids: list[int],
        params: SamplingParams,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> AsyncIterator[RequestState]:
        """Yields the request's state after every delta; the last one has finished. `rid` comes
        from `admitted`. Aborts the request if the consumer goes away (a client disconnect cancels
        the consumer), or once a stop string has ended it here."""
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        queue = self.queues[rid]
        text = None if self.detokenizer is None else self.detokenizer.stream(params)
        state = RequestState(rid, params, text, prompt_tokens=len(ids))
        self.counters.prompt_tokens += len(ids)
        try:
            await self.push.send(
                encode(
                    GenerateReq(rid, ids, params.to_dict(), seed, return_logprob, top_logprobs_num)
                )
            )
            while not state.finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                state.apply(item)
                self.counters.generation_tokens += len(item.token_ids)
                if state.ended_here:
                    await self.push.send(encode(AbortReq(rid)))
                yield state
            self.counters.requests["error" if state.error else "ok"] += 1
        finally:
            self.queues.pop(rid, None)
            if not state.finished and self.dead is None:
                self.counters.requests["aborted"] += 1
                await self.push.send(encode(AbortReq(rid)))

    async def _read_outputs(self) -> None:
        while True:
            msg = decode(await self.pull.recv())
            self.stats = msg.stats
            for out in msg.outputs:
                if (queue := self.queues.get(out.rid)) is not None:
                    queue.put_nowait(out)

    async def _watch_ranks(self) -> None:
        while self.dead is None:
            await asyncio.sleep(0.5)
            try:
                self.ranks.check_alive()
            except RankFailure as e:
                self.fail_all(str(e).splitlines()[0])

    def fail_all(self, reason: str) -> None:
        self.dead = reason
        logger.error("engine failed: %s", reason)
        for queue in self.queues.values():
            queue.put_nowait(EngineDead(reason))
        if self.on_dead is not None:
            self.on_dead(reason)

    async def shutdown(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.dead is None:
            with contextlib.suppress(asyncio.TimeoutError, zmq.ZMQError):
                await asyncio.wait_for(self.push.send(encode(ShutdownReq())), timeout=2.0)
        self.push.close(0)
        self.pull.close(0)
