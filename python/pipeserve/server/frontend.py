"""The server's bridge to stage 0: submits typed requests over IPC, routes the per-step deltas back
to each request's queue, and watches the ranks (a dead rank fails every pending request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import zmq
import zmq.asyncio

from pipeserve.frontend.detokenizer import Detokenizer
from pipeserve.frontend.ranks import RankFailure, RankGroup
from pipeserve.frontend.request_state import RequestState
from pipeserve.ipc.messages import (
    AbortReq,
    GenerateReq,
    IpcAddresses,
    ShutdownReq,
    TokenOut,
    decode,
    encode,
)
from pipeserve.sampling_params import SamplingParams
from pipeserve.server.metrics import ServerMetrics

logger = logging.getLogger("pipeserve.server")


class EngineDead(RuntimeError):
    """A rank died: nothing more will be answered."""


class ShuttingDown(RuntimeError):
    """The server is draining for a shutdown: no new requests, and unfinished ones past the grace
    period end."""


class QueueFull(RuntimeError):
    """More unfinished requests than --max-queued-requests."""


class OverBound(ValueError):
    """One HTTP request needs more engine requests than --max-queued-requests allows at all."""


SEND_TIMEOUT_S = 2.0  # stage 0 alive but not taking requests for this long is a failure
WATCH_PERIOD_S = 0.5  # rank liveness is also polled, besides the process sentinels


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
        self.metrics = ServerMetrics(self._stats, ranks.info.get("num_slots", 0))
        self.dead: str | None = None
        self.draining = False
        self.on_dead: Callable[[str], None] | None = None  # the launcher stops the server
        self.tasks: list[asyncio.Task] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Starts reading outputs and watching the ranks (a dead one is seen at once through its
        process sentinel, and by polling as a fallback)."""
        self.loop = loop = asyncio.get_running_loop()
        for proc in self.ranks.procs.values():
            with contextlib.suppress(ValueError, OSError):  # a process already joined
                loop.add_reader(proc.sentinel, self.is_alive)
        self.tasks = [
            asyncio.create_task(self._read_outputs()),
            asyncio.create_task(self._watch_ranks()),
        ]

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Runs `work` as a task that lives until it ends or the front end shuts down."""
        self.tasks.append(asyncio.ensure_future(work))

    def _stats(self) -> dict[str, Any]:
        return {**self.stats, "unfinished": len(self.queues)}

    # ---- liveness --------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        """Checks every rank now; the first dead one fails every pending request."""
        if self.dead is None:
            try:
                self.ranks.check_alive()
            except RankFailure as e:
                self.fail_all(str(e).splitlines()[0])
        return self.dead is None

    def check_alive(self) -> None:
        if not self.is_alive():
            raise EngineDead(self.dead)

    def _unwatch(self) -> None:
        if self.loop is None:
            return
        for proc in self.ranks.procs.values():
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(proc.sentinel)

    async def _watch_ranks(self) -> None:
        while self.is_alive():
            await asyncio.sleep(WATCH_PERIOD_S)

    def fail_all(self, reason: str) -> None:
        self.dead = reason
        logger.error("engine failed: %s", reason)
        self._unwatch()
        for queue in self.queues.values():
            queue.put_nowait(EngineDead(reason))
        if self.on_dead is not None:
            self.on_dead(reason)

    # ---- requests ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self, count: int) -> Iterator[list[str]]:
        """Request ids for all `count` engine requests of one HTTP request, each with its output
        queue, or ShuttingDown / EngineDead / QueueFull / OverBound before any of them starts: a
        request is admitted whole or not at all. Their queues are dropped on exit."""
        self.check_open()
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

    def check_open(self) -> None:
        """Raises ShuttingDown while draining, EngineDead once a rank has died."""
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        self.check_alive()

    async def generate(
        self,
        rid: str,
        ids: list[int],
        params: SamplingParams,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        priority: int = 0,
        streamed: bool = True,
    ) -> AsyncIterator[RequestState]:
        """Yields the request's state after every delta; the last one has finished. `rid` comes
        from `admitted`. Aborts the request if the consumer goes away (a client disconnect cancels
        the consumer), or once a stop string has ended it here."""
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        queue = self.queues[rid]
        text = None if self.detokenizer is None else self.detokenizer.stream(params, streamed)
        state = RequestState(rid, params, text, prompt_tokens=len(ids))
        track = self.metrics.track()
        try:
            await self._send(
                GenerateReq(
                    rid, ids, params.to_dict(), seed, return_logprob, top_logprobs_num, priority
                )
            )
            while not state.finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                state.apply(item)
                track.output(item)
                if state.ended_here:
                    await self._send(AbortReq(rid))
                yield state
            track.finished(state.error is None)
        finally:
            self.queues.pop(rid, None)
            if not state.finished and self.dead is None:
                track.aborted()
                with contextlib.suppress(EngineDead):
                    await self._send(AbortReq(rid))

    async def _send(self, msg: Any) -> None:
        """Hands `msg` to stage 0 without blocking: a send that cannot go out (stage 0 gone, or
        not reading) raises EngineDead at once if a rank is dead, else after SEND_TIMEOUT_S."""
        data = encode(msg)
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while True:
            try:
                await self.push.send(data, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise EngineDead(
                        f"stage 0 took no request for {SEND_TIMEOUT_S:g}s although every rank lives"
                    ) from None
                await asyncio.sleep(0.01)

    async def _read_outputs(self) -> None:
        while True:
            msg = decode(await self.pull.recv())
            self.stats = msg.stats
            for out in msg.outputs:
                if (queue := self.queues.get(out.rid)) is not None:
                    queue.put_nowait(out)

    async def drain(self, grace_s: float) -> None:
        """Refuses new requests; waits up to `grace_s` for the unfinished ones to finish, then ends
        the rest with ShuttingDown (a JSON 503, or a final error event on a stream)."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.queues and self.dead is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.queues:
            logger.warning(
                "shutdown: %d requests unfinished after %gs; ending them", len(self.queues), grace_s
            )
        reason = ShuttingDown(f"the server is shutting down; the request ran past {grace_s:g}s")
        for queue in self.queues.values():
            queue.put_nowait(reason)

    async def shutdown(self) -> None:
        """Stops watching the ranks (they are about to exit) and asks stage 0 to stop them."""
        self._unwatch()
        for t in self.tasks:
            t.cancel()
        if self.dead is None:
            with contextlib.suppress(EngineDead, zmq.ZMQError):
                await self._send(ShutdownReq())
        self.push.close(0)
        self.pull.close(0)
