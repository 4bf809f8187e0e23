"""server.push.Pusher: ASGI sends from synchronous code never block the caller and never reorder,
whether the send completes at once (a socket that takes the bytes) or must wait (a slow reader);
under uvicorn's httptools server a stream's middle chunks are written without a send."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from pipeserve.server.push import RAW_SEND, ChunkWriter, Pusher, PushStream, with_raw_send
from pipeserve.utils import free_port


def test_sends_that_must_wait_finish_in_order_and_later_ones_queue_behind():
    async def main() -> None:
        gate, got = asyncio.Event(), []

        async def send(message: dict) -> None:  # the second message waits, as a paused socket
            if message["n"] == 1:
                await gate.wait()
            got.append(message["n"])

        pusher = Pusher(send)
        for n in range(4):
            pusher.push({"n": n})  # returns at once each time
        assert got == [0] and pusher.task is not None
        await asyncio.sleep(0.01)
        assert got == [0]  # still waiting: nothing overtook the waiting send
        pusher.push({"n": 4})
        gate.set()
        await pusher.task
        assert got == [0, 1, 2, 3, 4] and pusher.task is None
        pusher.push({"n": 5})  # back on the direct path
        assert got == [0, 1, 2, 3, 4, 5] and pusher.task is None

    asyncio.run(main())


def test_a_send_that_yields_without_a_future_is_finished_too():
    async def main() -> None:
        got = []

        async def send(message: dict) -> None:
            await asyncio.sleep(0)  # a bare yield
            got.append(message["n"])

        pusher = Pusher(send)
        pusher.push({"n": 0})
        pusher.push({"n": 1})
        assert got == []
        await pusher.task
        assert got == [0, 1]

    asyncio.run(main())


def test_a_send_that_raises_is_logged_and_does_not_reach_the_caller(caplog):
    async def main() -> None:
        async def send(message: dict) -> None:
            raise RuntimeError("connection broken")

        Pusher(send).push({"n": 0})

    asyncio.run(main())
    assert "could not be sent" in caplog.text


def _serve_stream(app, port: int, http: str = "httptools"):
    """`app` under uvicorn (with httptools, as the launcher runs it) in a thread; its server."""
    import threading

    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(with_raw_send(app), port=port, http=http, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    return server


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_middle_chunks_go_straight_to_the_connection_and_arrive_whole_in_order(http):
    """Under uvicorn's httptools server, a stream's middle chunks take the ChunkWriter (no send
    per chunk); the client still reads a well-formed chunked body: every chunk, in order. Under
    h11, which frames chunks itself, every chunk goes through send."""
    seen: dict[str, object] = {}

    async def app(scope, receive, send):
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await send(start)
        pusher = Pusher(scope[RAW_SEND])
        seen["writer"] = pusher.writer
        sends = 0

        async def counting_send(message: dict) -> None:
            nonlocal sends
            sends += 1
            await scope[RAW_SEND](message)

        pusher.send = counting_send
        for i in range(200):
            pusher.push_chunk(b"chunk %d;" % i)
            pusher.push_chunk(b"")  # nothing: not a zero-length chunk, which would end the body
        seen["sends_for_middle_chunks"] = sends
        pusher.push({"type": "http.response.body", "body": b"end", "more_body": False})
        if pusher.task is not None:
            await pusher.task

    port = free_port()
    server = _serve_stream(app, port, http)
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/", timeout=10).content
    finally:
        server.should_exit = True
    if http == "httptools":
        assert isinstance(seen["writer"], ChunkWriter)
        assert seen["sends_for_middle_chunks"] == 0
    else:
        assert seen["writer"] is None and seen["sends_for_middle_chunks"] == 400
    assert body == b"".join(b"chunk %d;" % i for i in range(200)) + b"end"


def test_a_paused_connection_takes_chunks_through_send_in_order():
    """While the connection is paused (a slow reader), the writer declines and chunks queue
    behind the waiting send; once it resumes, the writer is used again."""

    class Flow:
        write_paused = True

    class Cycle:
        def __init__(self) -> None:
            self.flow, self.disconnected = Flow(), False
            self.chunked_encoding, self.response_complete = True, False
            self.written: list[bytes] = []
            self.transport = self
            self.resumed = asyncio.Event()

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def is_closing(self) -> bool:
            return False

        async def send(self, message: dict) -> None:
            if self.flow.write_paused:
                await self.resumed.wait()
            self.written.append(b"send:" + message["body"])

    async def main() -> None:
        cycle = Cycle()
        assert ChunkWriter.of(cycle.send) is None  # not uvicorn's httptools cycle
        pusher = Pusher(cycle.send, ChunkWriter(cycle))
        pusher.push_chunk(b"a")
        pusher.push_chunk(b"b")  # queued behind the waiting send, not written past it
        assert cycle.written == [] and pusher.task is not None
        cycle.flow.write_paused = False
        cycle.resumed.set()
        await pusher.task
        pusher.push_chunk(b"c")
        assert cycle.written == [b"send:a", b"send:b", b"1\r\nc\r\n"]

    asyncio.run(main())


def test_a_stream_ended_by_a_failure_takes_no_later_tokens(caplog):
    """The shutdown fails a stream (its final error event completes the response) while stage 0
    still runs the request for a moment: the tokens it sends meanwhile must not reach the
    connection (uvicorn raises on a body after the last)."""

    class Run:
        finished = False

    class Events:
        def step(self, changed: list[int]) -> list[bytes]:
            return [b"data: {}\n\n"]

        def end(self) -> list[bytes]:
            return []

    async def main() -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:  # as uvicorn's cycle: nothing after the last body
            if sent and not sent[-1]["more_body"]:
                raise RuntimeError("Unexpected ASGI message sent, after response completed")
            sent.append(message)

        stream = PushStream(Run(), Events(), [], lambda: None, lambda e: b"error")
        stream.pusher = Pusher(send)
        stream.step([0])
        stream.failed(RuntimeError("the server is shutting down"))
        stream.step([0])  # a token that was on its way
        return sent

    sent = asyncio.run(main())
    assert [m["more_body"] for m in sent] == [True, False]
    assert sent[-1]["body"].startswith(b"error")
    assert "could not be sent" not in caplog.text
