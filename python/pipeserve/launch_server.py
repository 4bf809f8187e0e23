"""`python -m pipeserve.launch_server [--model-path DIR] [--pp-size N] ...`

Node 0 spawns its ranks, waits until every rank is ready (logging weight-loading progress), then
serves HTTP. Other nodes (`--node-rank > 0`) only run their ranks. Ctrl-C or SIGTERM stops every
child process; a rank that dies makes the server fail pending requests and exit non-zero.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

from pipeserve.config import EngineConfig
from pipeserve.env import Env
from pipeserve.frontend.ranks import RankFailure, RankGroup, never_stopped, terminate
from pipeserve.frontend.stop_signals import (
    StopSignal,
    ignore_stop_signals,
    stop_on_signals,
    stop_requested,
)
from pipeserve.frontend.tokenizer import TokenizerNotFound
from pipeserve.ipc.sockets import IpcAddresses
from pipeserve.server.args import ServerConfig, parse_args
from pipeserve.server.workers import DEAD_LINGER_S
from pipeserve.utils import freeze_heap, quiet_exit, run_profiled

logger = logging.getLogger("pipeserve.launcher")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(
        level=cfg.engine.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop_on_signals()  # until uvicorn takes them over
    try:
        if cfg.engine.node_rank > 0:
            return run_worker_node(cfg.engine)
        _check_port_free(cfg.host, cfg.port)
        return serve(cfg)
    except (RankFailure, TokenizerNotFound) as e:  # while starting; later ones are handled apart
        logger.error("pipeserve could not start: %s", e)
        return 1
    except StopSignal as e:
        logger.info("stopped by %s while starting", e)
        return 0


def _check_port_free(host: str, port: int) -> None:
    """Fails before any rank starts if the HTTP port is taken. Binds as uvicorn's asyncio server
    will: every address `host` resolves to, SO_REUSEADDR (a port in TIME-WAIT from a previous run
    counts as free), IPv6 sockets IPv6-only."""
    with contextlib.ExitStack() as sockets:
        try:
            for family, kind, proto, _, addr in set(
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            ):
                s = sockets.enter_context(socket.socket(family, kind, proto))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(addr)
        except OSError as e:
            raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _start_ranks(engine: EngineConfig, ipc: IpcAddresses) -> RankGroup:
    e = engine
    logger.info(
        "starting %d rank(s) on this node: pp=%d tp=%d device=%s dtype=%s model=%s",
        e.ranks_per_node,
        e.pp_size,
        e.tp_size,
        e.device,
        e.dtype,
        e.model_path,
    )
    ranks = RankGroup(engine, ipc)
    start = time.monotonic()
    try:
        info = ranks.wait_ready()
    except BaseException:
        ranks.stop(grace_s=0)
        raise
    logger.info("ranks ready in %.1fs: %s", time.monotonic() - start, info)
    return ranks


def run_worker_node(engine: EngineConfig) -> int:
    """A node that only hosts ranks; it lives as long as they do."""
    ranks = _start_ranks(engine, IpcAddresses.fresh())
    try:
        while stop_requested() is None:  # also one whose raise was swallowed (`stop_signals`)
            time.sleep(0.5)
            ranks.check_alive()
        return 0
    except RankFailure as e:
        clean = all(p.exitcode == 0 for p in ranks.procs.values() if not p.is_alive())
        if not clean:
            logger.error("%s", str(e).splitlines()[0])
        return 0 if clean else 1
    except StopSignal:
        return 0
    finally:
        ignore_stop_signals()
        ranks.stop()


def serve(cfg: ServerConfig) -> int:
    shared_metrics = _share_metrics(cfg.api_server_count)  # before prometheus_client is imported
    try:
        return _serve(cfg)
    finally:
        if shared_metrics is not None:
            shutil.rmtree(shared_metrics, ignore_errors=True)


def _serve(cfg: ServerConfig) -> int:
    from pipeserve.server.assemble import LISTEN_BACKLOG, assemble, bind, load_text
    from pipeserve.server.workers import FrontendWorkers, Supervised

    engine = cfg.engine
    tokenizer = load_text(cfg)  # a missing one fails before any rank starts
    ipc = IpcAddresses.fresh(cfg.api_server_count)
    ranks: RankGroup | None = None
    workers: FrontendWorkers | None = None
    server: Any = None

    async def on_shutdown(frontend: Any) -> None:
        # the other front ends first (they drain in parallel), then stage 0 stops the ranks
        await workers.wait_exit(cfg.shutdown_timeout_s + 6)
        await frontend.shutdown()
        await asyncio.to_thread(ranks.stop)

    sock = bind(cfg.host, cfg.port)  # held while the ranks start (`bind`)
    try:  # to the end: a stop signal anywhere in it (also just after `ready`) stops every child
        ranks = _start_ranks(engine, ipc)
        sock.listen(LISTEN_BACKLOG)
        workers = FrontendWorkers(cfg, ipc, ranks.info, sock)
        workers.wait_ready(engine.ready_timeout_s)
        supervised = Supervised(ranks, workers)
        served = assemble(cfg, ipc, supervised, ranks.info, 0, on_shutdown, tokenizer)
        server = _http_server(cfg, served, ranks, workers)
        logger.info(
            "pipeserve is serving %r at %s (pp=%d, tp=%d, comm=%s, %d HTTP front end%s)",
            cfg.model_name,
            cfg.url,
            engine.pp_size,
            engine.tp_size,
            engine.pp_comm_mode,
            cfg.api_server_count,
            "" if cfg.api_server_count == 1 else "s",
        )
        print(f"pipeserve ready at {cfg.url}", flush=True)
        freeze_heap()
        run_profiled(lambda: server.run(sockets=[sock]), Env.read().profile_dir, "frontend0")
    finally:
        ignore_stop_signals()
        sock.close()
        if workers is not None:
            workers.stop()
        if ranks is not None and server is not None and server.started:
            ranks.stop()  # the server's shutdown told them to stop: their grace to exit
        elif ranks is not None:  # told nothing: no exit of their own to wait for
            ranks.stop(grace_s=0)
    return 1 if served.frontend.dead is not None else 0


def _http_server(cfg: ServerConfig, served: Any, ranks: RankGroup, workers: Any) -> Any:
    """The launcher's uvicorn server: the first SIGINT/SIGTERM drains, a second stops now, a
    dead rank or front end ends serving a moment later."""
    from pipeserve.server.assemble import uvicorn_server

    frontend = served.frontend
    server: Any = None

    def on_dead(reason: str) -> None:
        # keep answering 503 engine_dead for a moment: a client racing the death gets a reason,
        # not a refused connection
        workers.tell("dead", reason)
        asyncio.get_running_loop().call_later(DEAD_LINGER_S, setattr, server, "should_exit", True)

    async def drain() -> None:
        logger.info("draining: up to %gs for unfinished requests", cfg.shutdown_timeout_s)
        workers.tell("drain", cfg.shutdown_timeout_s)
        await frontend.drain(cfg.shutdown_timeout_s)
        server.should_exit = True

    def on_signal() -> None:  # in the signal handler: hand the drain to the event loop
        if frontend.loop is None:  # not serving yet: stop at once
            server.should_exit = True
        else:
            frontend.loop.call_soon_threadsafe(frontend.spawn, drain())

    frontend.on_dead = on_dead
    frontend.on_started = lambda: workers.tell("serve")  # every front end starts serving now
    server = uvicorn_server(cfg, served.app, own_signals=True)
    server.on_signal = on_signal
    server.on_stop_now = lambda: _stop_now(server, frontend, ranks, workers)
    return server


def _stop_now(server: Any, frontend: Any, ranks: RankGroup, workers: Any) -> None:
    """A second SIGINT/SIGTERM, in the signal handler: every unfinished request ends now with a
    503 (a final error event on a stream), serving stops, the other front ends stop at once, and
    the ranks get a second to exit."""
    logger.warning("second signal: stopping now")
    server.should_exit = True
    workers.tell("stop")
    ranks.hurry()
    if frontend.loop is not None:
        frontend.loop.call_soon_threadsafe(lambda: frontend.spawn(frontend.drain(0)))


def _exit(code: int) -> None:
    """Every child should be gone: a signal now must not turn the exit code into a death by
    signal, and the interpreter's teardown has nothing left to do but print the leak reports of
    Triton's bindings (the tokenizer's `transformers` import loads them), dozens of lines at every
    stop."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    # multiprocessing's exit handler joins every child, and a rank waits on its live parent: one
    # never stopped (a cleanup's bug) would hang the exit, so it is stopped and the exit says so
    left = multiprocessing.active_children()
    if missed := never_stopped(left):
        logger.error("%d child process(es) never stopped: stopping them at exit", len(missed))
        code = code or 1
    terminate(left)  # bounded: also those killed and still dying
    atexit._run_exitfuncs()  # what exit would run first: multiprocessing unlinks its semaphores
    quiet_exit(code)


def _share_metrics(api_server_count: int) -> str | None:
    """With several front ends, a directory for their Prometheus counters (multiprocess mode),
    named in the environment before any of them imports prometheus_client."""
    if api_server_count == 1:
        return None
    path = tempfile.mkdtemp(prefix="pipeserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


if __name__ == "__main__":
    _exit(main())
