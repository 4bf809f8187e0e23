"""server.push.Pusher: ASGI sends from synchronous code never block the caller and never reorder,
whether the send completes at once (a socket that takes the bytes) or must wait (a slow reader)."""

from __future__ import annotations

import asyncio

from pipeserve.server.push import Pusher


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
