"""What a front end pays to take one step message from stage 0, beyond applying it: the receiving
thread's CPU per ZeroMQ message, a sender (another thread) sending one small message per
--gap-ms as stage 0 sends one per step. Two receivers on uvloop: `await socket.recv()` of
zmq.asyncio (a future and a poller registration per message), and a reader callback on the
socket's descriptor that drains it with non-blocking receives (`server.frontend.Frontend`'s).
Every front end with a running request takes one message per step, however few its tokens.

    python benchmark/zmq_recv_cost.py --messages 3000 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time

import uvloop
import zmq
import zmq.asyncio

END = b"END"


def send_all(address: str, messages: int, size: int, gap_s: float) -> None:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(address)
    time.sleep(0.3)  # the receiver is waiting
    for _ in range(messages):
        push.send(b"x" * size)
        time.sleep(gap_s)
    push.send(END)
    push.close(linger=1000)


async def receive(mode: str, args: argparse.Namespace, address: str) -> float:
    """CPU seconds of this thread per message, from the first message to the end."""
    actx = zmq.asyncio.Context()
    sender = threading.Thread(
        target=send_all, args=(address, args.messages, args.bytes, args.gap_ms / 1000)
    )
    count, start = 0, None
    if mode == "zmq.asyncio recv":
        pull = actx.socket(zmq.PULL)
        pull.bind(address)
        sender.start()
        while await pull.recv() != END:
            start = start if start is not None else time.thread_time()
            count += 1
    else:
        pull = zmq.Context.shadow(actx.underlying).socket(zmq.PULL)
        pull.bind(address)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def drain() -> None:
            nonlocal count, start
            while True:
                try:
                    data = pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                if data == END:
                    done.done() or done.set_result(None)
                    return
                start = start if start is not None else time.thread_time()
                count += 1

        loop.add_reader(pull.getsockopt(zmq.FD), drain)
        sender.start()
        await done
        loop.remove_reader(pull.getsockopt(zmq.FD))
    spent = time.thread_time() - start
    sender.join()
    pull.close(linger=0)
    actx.term()
    return spent / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--bytes", type=int, default=200)
    p.add_argument("--gap-ms", type=float, default=1.0, help="between messages (a decode step)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            for i, mode in enumerate(("zmq.asyncio recv", "reader callback")):
                address = f"ipc://{d}/r{r}m{i}"
                us = uvloop.run(receive(mode, args, address)) * 1e6
                rows.append({"receiver": mode, "repeat": r, "us_per_message": round(us, 1)})
    print(
        f"{args.messages} messages of {args.bytes} bytes, one per {args.gap_ms} ms, cores {os.cpu_count()}"
    )
    print("| receiver | repeat | receiving thread's CPU per message, us |\n|---|---|---|")
    for row in rows:
        print(f"| {row['receiver']} | {row['repeat']} | {row['us_per_message']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
