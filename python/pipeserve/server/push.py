"""Server-sent events, and streams written from the output reader. An event is one JSON object
encoded by msgspec (a streamed token costs one). After each step, the reader hands every streaming
request its changed choices, and the request's events go out at once as one HTTP chunk, with no
task woken per request per step (the per-token cost of a streamed token is then its JSON and its
socket write). The request's own task sends the first events, then only waits for the end: the
last chunk, or the client going away (which aborts what is unfinished)."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import msgspec
from starlette.responses import Response

Send = Callable[[dict], Awaitable[None]]
logger = logging.getLogger("pipeserve.server")

encode_json = msgspec.json.Encoder().encode
DONE = b"data: [DONE]\n\n"


def sse_event(body: Any) -> bytes:
    return b"data: " + encode_json(body) + b"\n\n"


class Throttle:
    """Which changed choices of a stream get an event now: none after its last, and while it
    runs only every `interval` tokens (--stream-interval)."""

    def __init__(self, choices: int, interval: int) -> None:
        self.interval = interval
        self.sent = [0] * choices  # per choice: tokens when its last event went out
        self.ended = [False] * choices

    def take(self, i: int, s: Any) -> int | None:
        """For choice `i` in state `s` (a RequestState): the tokens sent before this event, now
        marked sent; None when no event is due."""
        if self.ended[i]:
            return None  # changed again after it finished: its last event is out
        if not s.finished and len(s.output_ids) - self.sent[i] < self.interval:
            return None
        start, self.sent[i], self.ended[i] = self.sent[i], len(s.output_ids), s.finished
        return start


class Events(Protocol):
    """A streamed answer's events, built step by step (openai_api.CompletionEvents,
    native.GenerateEvents)."""

    def step(self, changed: list[int]) -> list[bytes]: ...  # may raise (a failed choice)

    def end(self) -> list[bytes]: ...  # once every choice has finished


class ChunkWriter:
    """The middle chunks of a chunked response, written straight to the connection's transport
    where the server's `send` is uvicorn's httptools cycle (what `with_raw_send` leaves in the
    scope): one formatted write, without the coroutine, message dict and state checks that a send
    costs per chunk (a streamed token's largest Python cost after its JSON). The first and last
    chunks still go through `send`, which keeps the response's state; while the connection is
    paused for a slow reader, or gone, `write` declines and the caller sends instead (the send
    waits for the reader, or drops the chunk of a closed connection)."""

    def __init__(self, cycle: Any) -> None:
        self.cycle = cycle

    @classmethod
    def of(cls, send: Send) -> ChunkWriter | None:
        cycle = getattr(send, "__self__", None)
        names = ("transport", "flow", "disconnected", "chunked_encoding", "response_complete")
        httptools = type(cycle).__module__ == "uvicorn.protocols.http.httptools_impl"
        if not httptools or not all(hasattr(cycle, n) for n in names):
            return None  # another server (h11 frames chunks itself), or a wrapped send
        return cls(cycle)

    def write(self, body: bytes) -> bool:
        """Writes `body` as one chunk; False (nothing written) when it must be sent instead."""
        c = self.cycle
        if c.disconnected or c.flow.write_paused or c.chunked_encoding is not True:
            return False
        if c.response_complete or c.transport.is_closing():  # the send drops or logs it
            return False
        if body:  # an empty chunk would end the body: nothing is written for none
            c.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True


class Pusher:
    """Calls an ASGI `send` from synchronous code, in order, never blocking the caller. A send
    that completes without suspending (a socket that takes the bytes: the usual case) costs one
    call; one that must wait (the client reads slowly) finishes in a task, and later messages
    queue behind it."""

    def __init__(self, send: Send, writer: ChunkWriter | None = None) -> None:
        self.send = send
        self.writer = writer or ChunkWriter.of(send)
        self.backlog: collections.deque[dict] = collections.deque()
        self.task: asyncio.Task | None = None

    def push_chunk(self, body: bytes) -> None:
        """A chunk of a body with more to come: written to the connection at once where the
        server lets (ChunkWriter), else sent as `push` sends."""
        if self.task is None and self.writer is not None and self.writer.write(body):
            return
        self.push(_body([body], True))

    def push(self, message: dict) -> None:
        if self.task is not None:
            self.backlog.append(message)
            return
        coro = self.send(message)
        try:
            waiting = coro.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            return
        except Exception:  # the connection is broken: the request's task sees it go
            logger.exception("a streamed chunk could not be sent")
            return
        self.task = asyncio.ensure_future(self._finish(coro, waiting))  # type: ignore[arg-type]

    async def _finish(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        """Runs the suspended send to its end (as a task would), then the queued messages."""
        try:
            while True:
                if waiting is None:  # a bare yield
                    await asyncio.sleep(0)
                else:  # the future it waits on, taken over as a task takes it over
                    waiting._asyncio_future_blocking = False
                    await waiting
                try:
                    waiting = coro.send(None)
                except StopIteration:
                    break
            while self.backlog:
                await self.send(self.backlog.popleft())
        except BaseException:
            coro.close()
            raise
        finally:
            self.task = None


# the scope key under which `with_raw_send` leaves the server's send
RAW_SEND = "pipeserve.raw_send"


def with_raw_send(app: Any) -> Callable[[Any, Any, Send], Awaitable[None]]:
    """`app` under the HTTP server, leaving the server's own `send` in each scope: a stream's
    chunks after its first go out through it, past the framework's middleware wrappers (two
    coroutine layers per chunk that only watch for the response's start, which has gone)."""

    async def app_with_raw_send(scope: Any, receive: Any, send: Send) -> None:
        scope[RAW_SEND] = send
        await app(scope, receive, send)

    return app_with_raw_send


def _body(events: list[bytes], more: bool) -> dict:
    return {"type": "http.response.body", "body": b"".join(events), "more_body": more}


class PushStream(Response):
    """The ASGI response of a streaming request whose first events are out of `events` already;
    `close()` ends the request's admission (aborting what is unfinished) when the stream ends."""

    def __init__(
        self,
        run: Any,  # server.frontend.JobRun
        events: Events,
        first: list[bytes],
        close: Callable[[], None],
        as_error: Callable[[Exception], bytes],
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self.run, self.events, self.first, self.close = run, events, first, close
        self.as_error = as_error
        self.pusher: Pusher | None = None
        self.ended = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if self.run.finished:
                await send(_body(self.first + self.events.end(), False))
                return
            await send(_body(self.first, True))
            self.pusher = Pusher(scope.get(RAW_SEND, send))
            self.run.attach(self)
            while not self.ended:  # the last chunk went out, or the client has gone
                if (await receive())["type"] == "http.disconnect":
                    break
        finally:
            self.run.attach(None)
            self.close()

    def step(self, changed: list[int]) -> None:
        """The reader's call after a step in which some of the job's choices changed; none after
        the last chunk (a stream failed by the shutdown still gets its tokens until stage 0 has
        dropped it, and the response is complete: another chunk would be an ASGI error)."""
        if self.ended:
            return
        try:
            events = self.events.step(changed)
            if self.run.finished:
                self._end(events + self.events.end())
            elif events:
                self.pusher.push_chunk(b"".join(events))  # type: ignore[union-attr]
        except Exception as e:
            self.failed(e)

    def failed(self, error: Exception) -> None:
        """The job failed (a rank died, the server stops, a choice's error): a final error event."""
        self._end([self.as_error(error), DONE])

    def _end(self, events: list[bytes]) -> None:
        if not self.ended:
            self.ended = True
            self.pusher.push(_body(events, False))  # type: ignore[union-attr]
