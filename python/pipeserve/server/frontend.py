"""The server's bridge to stage 0: submits typed requests over IPC, applies each step's columnar
outputs to the requests' states (detokenizing there, once per step), wakes the HTTP requests that
own them, and watches the ranks (a dead rank fails every pending request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

import zmq
import zmq.asyncio

from pipeserve.frontend.client import RequestClient, RequestOptions
from pipeserve.frontend.detokenizer import Detokenizer
from pipeserve.frontend.ranks import RankFailure
from pipeserve.frontend.request_state import RequestState
from pipeserve.ipc.messages import (
    AbortReq,
    GenerateBatch,
    ImageIn,
    ShutdownReq,
    StepOut,
    ToStage0,
    decode_output,
    encode,
)
from pipeserve.ipc.sockets import IpcAddresses, queued
from pipeserve.sampling_params import SamplingParams
from pipeserve.server.metrics import RequestTrack, ServerMetrics

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


class Ranks(Protocol):
    """What a front end watches: RankGroup in the launcher, a RankWatch in a front-end process."""

    def check_alive(self) -> None: ...  # raises RankFailure naming the first dead rank

    def sentinels(self) -> list[int]: ...  # descriptors readable once a rank has gone


SEND_TIMEOUT_S = 2.0  # stage 0 alive but not taking requests for this long is a failure
WATCH_PERIOD_S = 0.5  # rank liveness is also polled, besides the process sentinels


class Sink(Protocol):
    """Takes a job's changes synchronously, from the output reader (server.push.PushStream)."""

    def step(self, changed: list[int]) -> None: ...

    def failed(self, error: Exception) -> None: ...


class JobRun:
    """The engine requests of one HTTP request, and what changed since its consumer looked. A
    consumer that wants only the final states (`each_step` False) is woken when a choice ends, not
    at every step (one wake per request instead of one per token); an attached Sink is handed
    each step's changes by the reader itself, waking no task."""

    def __init__(self, rids: list[str], each_step: bool = True) -> None:
        self.rids = rids
        self.each_step = each_step
        self.states: list[RequestState] = []
        self.tracks: list[RequestTrack] = []
        self.changed: dict[int, None] = {}  # choice indices, in order of change
        self.error: BaseException | None = None
        self.event = asyncio.Event()
        self.sink: Sink | None = None

    def notify(self, index: int) -> None:
        self.changed[index] = None
        if self.sink is None:
            self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        if self.sink is not None:
            self.sink.failed(error)  # type: ignore[arg-type]
        else:
            self.event.set()

    def attach(self, sink: Sink | None) -> None:
        """From now on `sink` takes the changes (None: the event again); what changed or failed
        before is handed over at once."""
        self.sink = sink
        if sink is not None and self.error is not None:
            sink.failed(self.error)  # type: ignore[arg-type]
        elif sink is not None and self.changed:
            self.flush()

    def flush(self) -> None:
        """Hands the step's changes to the sink (the reader calls it once per step and job)."""
        if self.sink is not None and self.changed:
            changed, self.changed = list(self.changed), {}
            self.sink.step(changed)

    async def next_changes(self) -> list[int]:
        """Waits for the next change; the indices of the choices that changed, each once."""
        await self.event.wait()
        self.event.clear()
        if self.error is not None:
            raise self.error
        changed, self.changed = list(self.changed), {}
        return changed

    @property
    def finished(self) -> bool:
        for s in self.states:  # noqa: SIM110 - a loop, not all(): asked per stream per step
            if s.finish_reason is None:
                return False
        return True


class Frontend:
    def __init__(
        self,
        ranks: Ranks,
        ipc: IpcAddresses,
        max_queued: int | None,
        detokenizer: Detokenizer | None = None,  # None: no tokenizer, token ids only
        kv_slots: int = 0,
        owner: int = 0,
        stream_interval: int = 1,
    ) -> None:
        self.ranks = ranks
        self.stream_interval = stream_interval
        self.client = RequestClient(detokenizer, owner)
        ctx = zmq.asyncio.Context.instance()
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.bind(ipc.requests(owner))
        # read from the loop's reader callback, without zmq.asyncio's future per message (every
        # front end with a running request takes one message per step, however few its tokens)
        self.pull = zmq.Context.shadow(ctx.underlying).socket(zmq.PULL)
        self.pull.bind(ipc.outputs(owner))
        self.max_queued = max_queued
        self.routes: dict[str, tuple[JobRun, int]] = {}  # rid: (its job, its choice index)
        self.stats: dict[str, Any] = {}
        self.metrics = ServerMetrics(lambda: self.stats, kv_slots)
        self.dead: str | None = None
        self.draining = False
        self.on_dead: Callable[[str], None] | None = None  # the launcher stops the server
        self.on_started: Callable[[], None] | None = None  # once it reads outputs
        self.tasks: list[asyncio.Task] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Starts reading outputs and watching the ranks (a dead one is seen at once through its
        sentinel, and by polling as a fallback)."""
        self.loop = loop = asyncio.get_running_loop()
        for fd in self.ranks.sentinels():
            with contextlib.suppress(ValueError, OSError):  # a process already joined
                loop.add_reader(fd, self.is_alive)
        loop.add_reader(self.pull.getsockopt(zmq.FD), self._read_outputs)
        loop.call_soon(self._read_outputs)  # what came before the descriptor was watched
        self.tasks = [asyncio.create_task(self._watch_ranks())]
        if self.on_started is not None:
            self.on_started()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Runs `work` as a task that lives until it ends or the front end shuts down."""
        self.tasks.append(asyncio.ensure_future(work))

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
        for fd in self.ranks.sentinels():
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(fd)

    async def _watch_ranks(self) -> None:
        while self.is_alive():
            await asyncio.sleep(WATCH_PERIOD_S)

    def fail_all(self, reason: str) -> None:
        self.dead = reason
        logger.error("engine failed: %s", reason)
        self._unwatch()
        self._fail_jobs(EngineDead(reason))
        if self.on_dead is not None:
            self.on_dead(reason)

    def _fail_jobs(self, error: BaseException) -> None:
        for job, _ in list(self.routes.values()):
            job.fail(error)

    # ---- requests ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self, count: int, each_step: bool = True) -> Iterator[JobRun]:
        """A JobRun with request ids for all `count` engine requests of one HTTP request, or
        ShuttingDown / EngineDead / QueueFull / OverBound before any of them starts: a request is
        admitted whole or not at all. On exit, its unfinished requests are aborted at stage 0."""
        self.check_open()
        if self.max_queued is not None and count > self.max_queued:
            raise OverBound(
                f"this request needs {count} sequences (prompts x n); the server's bound on "
                f"unfinished requests is {self.max_queued}"
            )
        if self.max_queued is not None and len(self.routes) + count > self.max_queued:
            raise QueueFull(
                f"{len(self.routes)} requests are unfinished; the server's bound is {self.max_queued}"
            )
        job = JobRun([self.client.new_rid() for _ in range(count)], each_step)
        self.routes.update((rid, (job, i)) for i, rid in enumerate(job.rids))
        self.metrics.unfinished.set(len(self.routes))
        try:
            yield job
        finally:
            self._end(job)

    def _end(self, job: JobRun) -> None:
        """Drops the job's routes; aborts at stage 0 what has not finished (a client gone)."""
        for rid in job.rids:
            self.routes.pop(rid, None)
        self.metrics.unfinished.set(len(self.routes))
        for state, track in zip(job.states, job.tracks, strict=True):
            if state.finished:
                continue
            self.client.forget(state.rid)
            if self.dead is None:
                track.aborted()
                self._send_nowait(AbortReq(state.rid))

    def check_open(self) -> None:
        """Raises ShuttingDown while draining, EngineDead once a rank has died."""
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        self.check_alive()

    async def submit(
        self,
        job: JobRun,
        items: list[tuple[list[int], SamplingParams, list[ImageIn]]],
        opts: RequestOptions,
    ) -> None:
        """Sends the job's requests (one per rid, in order: ids, params, images) as one message."""
        reqs = []
        for rid, (ids, params, images) in zip(job.rids, items, strict=True):
            req, state = self.client.new_request(ids, params, opts, rid, images)
            reqs.append(req)
            job.states.append(state)
            job.tracks.append(self.metrics.track())
        await self._send(reqs[0] if len(reqs) == 1 else GenerateBatch(reqs))

    async def _send(self, msg: ToStage0) -> None:
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

    def _send_nowait(self, msg: ToStage0) -> None:
        """For aborts: a message that cannot go out now is dropped (stage 0 is gone)."""
        with contextlib.suppress(zmq.Again, zmq.ZMQError):
            self.push.send(encode(msg), flags=zmq.NOBLOCK)

    def _read_outputs(self) -> None:
        """The reader callback: applies every step message that has arrived (the socket's
        descriptor signals edges, so it reads until none is left)."""
        for data in queued(self.pull):
            try:
                self._apply(decode_output(data))
            except Exception:  # a defect here must not stop the outputs of every other request
                logger.exception("a step's outputs could not be applied")

    def _apply(self, msg: StepOut) -> None:
        self.stats = msg.stats
        applied, ended_here = self.client.apply(msg)
        self.metrics.generation_tokens.inc(sum(len(out.token_ids) for _, out in applied))
        pushed: dict[int, JobRun] = {}  # jobs whose sinks take this step's changes
        for state, out in applied:
            route = self.routes.get(state.rid)
            if route is None:
                continue
            job, index = route
            track = job.tracks[index]
            track.output(out)
            if state.finished:
                track.finished(state.error is None)
            if job.each_step or state.finished or state.error is not None:
                job.notify(index)
            if job.sink is not None:
                pushed[id(job)] = job
        for job in pushed.values():
            job.flush()
        for rid in ended_here:
            self._send_nowait(AbortReq(rid))

    async def drain(self, grace_s: float) -> None:
        """Refuses new requests; waits up to `grace_s` for the unfinished ones to finish, then ends
        the rest with ShuttingDown (a JSON 503, or a final error event on a stream)."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.routes and self.dead is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.routes:
            logger.warning(
                "shutdown: %d requests unfinished after %gs; ending them", len(self.routes), grace_s
            )
        self._fail_jobs(
            ShuttingDown(f"the server is shutting down; the request ran past {grace_s:g}s")
        )

    async def shutdown(self, stop_ranks: bool = True) -> None:
        """Stops watching the ranks (they are about to exit) and, with `stop_ranks`, asks stage 0
        to stop them (also after a failure: without it, live ranks wait out the launcher's grace
        period, then get killed)."""
        self._unwatch()
        if self.loop is not None:
            self.loop.remove_reader(self.pull.getsockopt(zmq.FD))
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if stop_ranks and self.dead is None:
            with contextlib.suppress(EngineDead, zmq.ZMQError):
                await self._send(ShutdownReq())
        elif stop_ranks:  # failed: every rank may still live (a front end died), and exit now
            self._send_nowait(ShutdownReq())
        self.push.close(0)
        self.pull.close(0)
