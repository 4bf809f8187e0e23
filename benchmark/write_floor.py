"""The floor under a streamed token's CPU cost in a front end: one small write to a client's TCP
socket (an SSE chunk, one per request per step at --stream-interval 1). A writer process keeps
--conns loopback connections to a reader process and writes one --bytes chunk to each per step,
as a front end does after a decode step; the writer's own CPU time (user + system, from
getrusage) over the steps, divided by the writes, is what every streamed token costs before any
JSON, detokenization or framework code. Two writers: plain `socket.send` (the least Python
possible) and an asyncio transport under uvloop when it is installed (what uvicorn writes with).

    python benchmark/write_floor.py --conns 256 --steps 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import selectors
import socket
import time


def reader(port: int, conns: int, ready: mp.Event) -> None:
    """Accepts `conns` connections and reads everything until each closes."""
    listener = socket.create_server(("127.0.0.1", port), backlog=conns)
    ready.set()
    sel = selectors.DefaultSelector()
    for _ in range(conns):
        conn, _ = listener.accept()
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)
    open_conns = conns
    while open_conns:
        for key, _ in sel.select():
            if not key.fileobj.recv(1 << 16):
                sel.unregister(key.fileobj)
                key.fileobj.close()
                open_conns -= 1


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def connect(port: int, conns: int) -> list[socket.socket]:
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    return socks


def plain_writes(socks: list[socket.socket], chunk: bytes, steps: int, step_s: float) -> float:
    """CPU seconds of `steps` rounds of one send per socket, a pause of `step_s` between rounds."""
    start = cpu_s()
    for _ in range(steps):
        for s in socks:
            s.send(chunk)
        time.sleep(step_s)
    return cpu_s() - start


async def transport_writes(
    socks: list[socket.socket], chunk: bytes, steps: int, step_s: float
) -> float:
    loop = asyncio.get_running_loop()
    transports = []
    for s in socks:
        t, _ = await loop.connect_accepted_socket(asyncio.Protocol, s)
        transports.append(t)
    start = cpu_s()
    for _ in range(steps):
        for t in transports:
            t.write(chunk)
        await asyncio.sleep(step_s)
    spent = cpu_s() - start
    for t in transports:
        t.close()
    await asyncio.sleep(0.05)
    return spent


def run_one(kind: str, args: argparse.Namespace, port: int) -> dict:
    ready = mp.Event()
    proc = mp.Process(target=reader, args=(port, args.conns, ready), daemon=True)
    proc.start()
    ready.wait(30)
    socks = connect(port, args.conns)
    chunk = b"x" * args.bytes
    step_s = args.step_ms / 1000
    if kind == "socket.send":
        spent = plain_writes(socks, chunk, args.steps, step_s)
        for s in socks:
            s.close()
    else:
        runner = asyncio.run
        if kind == "uvloop transport":
            import uvloop

            runner = uvloop.run
        spent = runner(transport_writes(socks, chunk, args.steps, step_s))
    proc.join(30)
    writes = args.conns * args.steps
    return {
        "writer": kind,
        "writes": writes,
        "cpu_s": round(spent, 4),
        "us_per_write": round(spent / writes * 1e6, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=256, help="client connections (requests in flight)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--bytes", type=int, default=160, help="one SSE chunk (a completion token's)")
    p.add_argument(
        "--step-ms", type=float, default=2.0, help="pause between rounds (a decode step)"
    )
    p.add_argument("--port", type=int, default=31977)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    kinds = ["socket.send", "asyncio transport"]
    try:
        import uvloop  # noqa: F401

        kinds.append("uvloop transport")
    except ImportError:
        pass
    rows = [run_one(kind, args, args.port + i) for i, kind in enumerate(kinds)]
    print(
        f"{args.conns} connections, {args.steps} steps, {args.bytes}-byte chunks, host cores {os.cpu_count()}"
    )
    print("| writer | writes | writer CPU s | us per write |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['writer']} | {r['writes']} | {r['cpu_s']} | {r['us_per_write']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
