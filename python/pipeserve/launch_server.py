"""`python -m pipeserve.launch_server [--model-path DIR] [--pp-size N] ...`

Node 0 spawns its ranks, waits until every rank is ready (logging weight-loading progress), then
serves HTTP. Other nodes (`--node-rank > 0`) only run their ranks. Ctrl-C or SIGTERM stops every
child process; a rank that dies makes the server fail pending requests and exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Iterator

from pipeserve.config import EngineConfig
from pipeserve.engine.ipc import IpcAddresses
from pipeserve.engine.processes import RankFailure, RankGroup
from pipeserve.engine.tokenizer import TokenizerNotFound
from pipeserve.server.args import ServerConfig, parse_args

logger = logging.getLogger("pipeserve.launcher")


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
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """Graceful stop on SIGINT/SIGTERM, then a normal exit (uvicorn would re-raise them)."""
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def serve(cfg: ServerConfig) -> int:
    import uvicorn

    from pipeserve.engine.detokenizer import Detokenizer
    from pipeserve.engine.tokenizer import load_tokenizer
    from pipeserve.model.config import ModelConfig
    from pipeserve.server.app import build_app
    from pipeserve.server.frontend import Frontend
    from pipeserve.server.openai_api import ModelInfo, NoTokenizer

    engine = cfg.engine
    tokenizer = detokenizer = None
    if not engine.skip_tokenizer_init:
        tokenizer = load_tokenizer(engine.tokenizer_path or engine.model_path)
        detokenizer = Detokenizer(tokenizer)
    ipc = IpcAddresses.fresh()
    ranks = _start_ranks(engine, ipc)
    info = ModelInfo(
        tokenizer or NoTokenizer(),
        {cfg.model_name, engine.model_path},
        cfg.model_name,
        ModelConfig.from_dir(engine.model_path).vocab_size,
        ranks.info["context_length"],
    )
    server: uvicorn.Server | None = None
    frontend = Frontend(ranks, ipc, cfg.max_queued_requests, detokenizer)

    async def on_shutdown() -> None:
        await frontend.shutdown()
        await asyncio.to_thread(ranks.stop)

    def on_dead(reason: str) -> None:
        server.should_exit = True

    frontend.on_dead = on_dead
    app = build_app(frontend, info, on_shutdown)
    server = _uvicorn_server_class()(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level=engine.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    )
    logger.info(
        "pipeserve is serving %r at %s (pp=%d, tp=%d, comm=%s)",
        cfg.model_name,
        cfg.url,
        engine.pp_size,
        engine.tp_size,
        engine.pp_comm_mode,
    )
    print(f"pipeserve ready at {cfg.url}", flush=True)
    try:
        server.run()
    finally:
        ranks.stop()
    return 1 if frontend.dead is not None else 0


if __name__ == "__main__":
    sys.exit(main())
