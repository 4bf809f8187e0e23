"""`python -m pipeserve.launch_server [--model-path DIR] [--pp-size N] ...`

Node 0 spawns its ranks, waits until every rank is ready (logging weight-loading progress), then
serves HTTP. Other nodes (`--node-rank > 0`) only run their ranks. Ctrl-C or SIGTERM stops every
child process; a rank that dies makes the server fail pending requests and exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from pipeserve.config import EngineConfig
from pipeserve.frontend.ranks import RankFailure, RankGroup
from pipeserve.frontend.tokenizer import TokenizerNotFound
from pipeserve.ipc.messages import IpcAddresses
from pipeserve.server.args import ServerConfig, parse_args

logger = logging.getLogger("pipeserve.launcher")
DEAD_LINGER_S = 1.0  # after a rank died: seconds of 503 engine_dead answers before the exit


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(
        level=cfg.engine.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if cfg.engine.node_rank > 0:
            return run_worker_node(cfg.engine)
        _check_port_free(cfg.host, cfg.port)
        return serve(cfg)
    except (RankFailure, TokenizerNotFound) as e:  # while starting; later ones are handled apart
        logger.error("pipeserve could not start: %s", e)
        return 1


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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(0.5)
            ranks.check_alive()
    except RankFailure as e:
        clean = all(p.exitcode == 0 for p in ranks.procs.values() if not p.is_alive())
        if not clean:
            logger.error("%s", str(e).splitlines()[0])
        return 0 if clean else 1
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        ranks.stop()


def _uvicorn_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """On the first SIGINT/SIGTERM calls `on_signal` (the drain) instead of stopping; a later
        one calls `on_stop_now`. Exits normally (uvicorn would re-raise them), and keeps both
        handlers after serving: a signal while the ranks stop must not kill the launcher."""

        on_signal: Callable[[], None] | None = None
        on_stop_now: Callable[[], None] | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self.handle_exit)
            yield

        def handle_exit(self, sig: int, frame: Any) -> None:
            on_signal, self.on_signal = self.on_signal, None
            with contextlib.suppress(RuntimeError):  # the event loop has closed: stopping already
                if on_signal is not None:
                    on_signal()
                elif self.on_stop_now is not None:
                    self.on_stop_now()
                else:
                    super().handle_exit(sig, frame)

    return Server


def _stop_now(server: Any, frontend: Any, ranks: RankGroup) -> None:
    """A second SIGINT/SIGTERM, in the signal handler: every unfinished request ends now with a
    503 (a final error event on a stream), serving stops, and the ranks get a second to exit."""
    logger.warning("second signal: stopping now")
    server.should_exit = True
    ranks.hurry()
    if frontend.loop is not None:
        frontend.loop.call_soon_threadsafe(lambda: frontend.spawn(frontend.drain(0)))


def serve(cfg: ServerConfig) -> int:
    import uvicorn

    from pipeserve.frontend.detokenizer import Detokenizer
    from pipeserve.frontend.tokenizer import load_tokenizer
    from pipeserve.model.config import ModelConfig
    from pipeserve.server.app import build_app
    from pipeserve.server.frontend import Frontend
    from pipeserve.server.limits import max_prompt_chars
    from pipeserve.server.openai_api import ModelInfo, NoTokenizer

    engine = cfg.engine
    tokenizer = detokenizer = None
    if not engine.skip_tokenizer_init:
        tokenizer = load_tokenizer(engine.tokenizer_path or engine.model_path)
        detokenizer = Detokenizer(tokenizer)
    ipc = IpcAddresses.fresh()
    ranks = _start_ranks(engine, ipc)
    context, slots = ranks.info["context_length"], ranks.info["num_slots"]
    info = ModelInfo(
        tokenizer or NoTokenizer(),
        {cfg.model_name, engine.model_path},
        cfg.model_name,
        ModelConfig.from_dir(engine.model_path).vocab_size,
        context,
        slots,
        max_prompt_chars(tokenizer, min(context, slots)),
    )
    server: uvicorn.Server | None = None
    frontend = Frontend(ranks, ipc, cfg.max_queued_requests, detokenizer)

    async def on_shutdown() -> None:
        await frontend.shutdown()
        await asyncio.to_thread(ranks.stop)

    def on_dead(reason: str) -> None:
        # keep answering 503 engine_dead for a moment: a client racing the death gets a reason,
        # not a refused connection
        asyncio.get_running_loop().call_later(DEAD_LINGER_S, setattr, server, "should_exit", True)

    async def drain() -> None:
        logger.info("draining: up to %gs for unfinished requests", cfg.shutdown_timeout_s)
        await frontend.drain(cfg.shutdown_timeout_s)
        server.should_exit = True

    def on_signal() -> None:  # in the signal handler: hand the drain to the event loop
        if frontend.loop is None:  # not serving yet: stop at once
            server.should_exit = True
        else:
            frontend.loop.call_soon_threadsafe(frontend.spawn, drain())

    frontend.on_dead = on_dead
    app = build_app(frontend, info, on_shutdown, cfg.max_request_body_bytes)
    server = _uvicorn_server_class()(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level=engine.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,  # after the drain: for the last answers to go out
        )
    )
    server.on_signal = on_signal
    server.on_stop_now = lambda: _stop_now(server, frontend, ranks)
    logger.info(
        "pipeserve is serving %r at %s (pp=%d, tp=%d, comm=%s)",
        cfg.model_name,
        cfg.url,
        engine.pp_size,
        engine.tp_size,
        engine.pp_comm_mode,
    )
    print(f"pipeserve ready at {cfg.url}", flush=True)
    gc.collect()
    gc.freeze()  # start-up's objects live on, as in the ranks (worker.run_rank): no collection walks them
    try:
        server.run()
    finally:
        ranks.stop()
    return 1 if frontend.dead is not None else 0


def _exit(code: int) -> None:
    """Every child is gone: a signal now must not turn the exit code into a death by signal (at
    exit, Python resets the handlers it installed to the default, but leaves SIG_IGN)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
