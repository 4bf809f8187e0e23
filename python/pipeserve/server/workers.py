"""HTTP front-end processes beyond the launcher's own (`--api-server-count N`: N - 1 of them).

Each runs the same app on the launcher's listening socket, with its own tokenizer, detokenizer and IPC
pair to stage 0 (its `owner` index), so tokenizing, detokenizing and streaming scale past one core.
The launcher supervises: it sees the ranks and these processes die, owns the signals, and tells
every front end over its control pipe to drain ("drain", grace), that the engine failed ("dead",
reason) or to stop at once ("stop"). A front end reports ("ready", owner) once it is built and
serves once the launcher's own front end does ("serve"): no client reaches a group that is still
starting, and a signal then finds the launcher ready for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import signal
import socket
import time
from typing import Any

from pipeserve.frontend.main_guard import spawnable_main
from pipeserve.frontend.ranks import RankFailure, RankGroup, terminate
from pipeserve.frontend.stop_signals import signals_deferred
from pipeserve.ipc.sockets import IpcAddresses
from pipeserve.server.args import ServerConfig

logger = logging.getLogger("pipeserve.launcher")
DEAD_LINGER_S = 1.0  # after a rank died: seconds of 503 engine_dead answers before the exit


class FrontendWorkers:
    """The launcher's side: spawns front ends 1..count-1, waits for them, tells them things."""

    def __init__(
        self, cfg: ServerConfig, ipc: IpcAddresses, info: dict[str, Any], sock: socket.socket
    ) -> None:
        ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.pipes: dict[int, Any] = {}
        self.leaving = False  # told to drain or stop: their exits are expected
        try:
            for owner in range(1, cfg.api_server_count):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=run_frontend,
                    args=(cfg, ipc, info, owner, theirs, sock),
                    name=f"pipeserve-frontend{owner}",
                    daemon=True,
                )
                with spawnable_main(), signals_deferred():
                    proc.start()
                    self.procs[owner], self.pipes[owner] = proc, ours  # before a StopSignal
                theirs.close()
        except BaseException:  # StopSignal, or a spawn that failed
            self.stop()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        """Blocks until every front end is built; raises RankFailure if one fails or is late."""
        deadline = time.monotonic() + timeout_s
        for owner, pipe in self.pipes.items():
            while not pipe.poll(0.2):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RankFailure(f"front end {owner} did not start within {timeout_s:g}s")
            kind, payload = pipe.recv()
            if kind != "ready":
                raise RankFailure(f"front end {owner} failed while starting:\n{payload}")

    def check_alive(self) -> None:
        for owner, proc in self.procs.items():
            if not proc.is_alive() and not self.leaving:
                raise RankFailure(
                    f"front end {owner} ({proc.name}) exited with code {proc.exitcode}"
                )

    def tell(self, kind: str, payload: Any = None) -> None:
        self.leaving = self.leaving or kind in ("drain", "stop")
        for pipe in self.pipes.values():
            with contextlib.suppress(OSError, ValueError):  # that front end is gone
                pipe.send((kind, payload))

    async def wait_exit(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for every front end to exit, then stops what is left."""
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in self.procs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        """Tells those still there to stop at once (one waiting to serve, or draining past its
        time), then terminates what is left."""
        self.tell("stop")
        terminate(self.procs.values())


class Supervised:
    """The launcher front end's view of what must live: every rank and every other front end."""

    def __init__(self, ranks: RankGroup, workers: FrontendWorkers) -> None:
        self.ranks, self.workers = ranks, workers

    def check_alive(self) -> None:
        self.ranks.check_alive()
        self.workers.check_alive()

    def sentinels(self) -> list[int]:
        # the ranks' only: a front end that exits while draining stays readable; their deaths are
        # seen by polling (Frontend.WATCH_PERIOD_S)
        return self.ranks.sentinels()


class ControlWatch:
    """A spawned front end's view of the ranks: what the launcher says over the control pipe (the
    pipe closing means the launcher is gone)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.dead: str | None = None
        self.on_drain: Any = None  # called with the grace period
        self.on_stop: Any = None

    def sentinels(self) -> list[int]:
        return [self.conn.fileno()]

    def check_alive(self) -> None:
        while self.dead is None and self._poll():
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                self.dead = "the launcher exited"
                break
            if kind == "dead":
                self.dead = payload
            elif kind == "drain" and self.on_drain is not None:
                self.on_drain(payload)
            elif kind == "stop" and self.on_stop is not None:
                self.on_stop()
        if self.dead is not None:
            raise RankFailure(self.dead)

    def _poll(self) -> bool:
        try:
            return self.conn.poll()
        except (EOFError, OSError):
            self.dead = self.dead or "the launcher exited"
            return False


def run_frontend(
    cfg: ServerConfig,
    ipc: IpcAddresses,
    info: dict[str, Any],
    owner: int,
    conn: Any,
    sock: socket.socket,
) -> None:
    """A spawned front end's main: serves until the launcher says otherwise."""
    from pipeserve.env import Env
    from pipeserve.server.assemble import assemble, uvicorn_server
    from pipeserve.utils import freeze_heap, quiet_exit, run_profiled, set_process_title

    set_process_title(f"pipeserve-frontend{owner}")
    logging.basicConfig(
        level=cfg.engine.log_level.upper(),
        format=f"[frontend {owner}] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher owns them: it says drain or stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = ControlWatch(conn)
    try:
        served = assemble(cfg, ipc, control, info, owner, _leave_ranks)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    server = uvicorn_server(cfg, served.app, own_signals=False)
    frontend = served.frontend

    async def drain(grace_s: float) -> None:
        await frontend.drain(grace_s)
        server.should_exit = True

    def stop() -> None:
        server.should_exit = server.force_exit = True

    control.on_drain = lambda grace_s: frontend.spawn(drain(grace_s))
    control.on_stop = stop
    frontend.on_dead = lambda _: asyncio.get_running_loop().call_later(
        DEAD_LINGER_S, setattr, server, "should_exit", True
    )
    conn.send(("ready", owner))
    if not _serve_when_told(conn):
        quiet_exit(0)
    freeze_heap()  # as the launcher's front end: no collection walks the imports' objects
    run_profiled(lambda: server.run(sockets=[sock]), Env.read().profile_dir, f"frontend{owner}")
    quiet_exit(0)


def _serve_when_told(conn: Any) -> bool:
    """Waits for the launcher's "serve"; False if it says anything else first or exits (the pipe
    closes then, which bounds the wait)."""
    try:
        kind, _ = conn.recv()
    except (EOFError, OSError):
        return False
    return kind == "serve"


async def _leave_ranks(frontend: Any) -> None:
    """A spawned front end's shutdown: the launcher stops the ranks."""
    await frontend.shutdown(stop_ranks=False)
