"""One front-end process's pieces, built the same way in the launcher and in every other HTTP
front-end process: the tokenizer and detokenizer, the model's limits, the Frontend, the app and
the uvicorn server. The launcher binds the one listening socket and hands it to every front end:
they all accept from it, so a connection goes to a front end that is free to take it (a kernel
hash over several sockets, SO_REUSEPORT, left some front ends with several times the connections
of others)."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeserve.frontend.detokenizer import Detokenizer
from pipeserve.frontend.images import ImageProcessor
from pipeserve.frontend.stop_signals import stop_requested
from pipeserve.frontend.tokenizer import load_tokenizer
from pipeserve.ipc.sockets import IpcAddresses
from pipeserve.server.app import build_app
from pipeserve.server.args import ServerConfig
from pipeserve.server.frontend import Frontend, Ranks
from pipeserve.server.limits import max_prompt_chars
from pipeserve.server.openai_api import ModelInfo, NoTokenizer


@dataclass
class Served:
    frontend: Frontend
    app: Any  # FastAPI
    model: ModelInfo


def load_text(cfg: ServerConfig) -> Any:
    """The tokenizer (None with --skip-tokenizer-init); TokenizerNotFound names the flags."""
    engine = cfg.engine
    if engine.skip_tokenizer_init:
        return None
    return load_tokenizer(engine.tokenizer_path or engine.model_path)


def assemble(
    cfg: ServerConfig,
    ipc: IpcAddresses,
    ranks: Ranks,
    info: dict[str, Any],
    owner: int,
    on_shutdown: Callable[[Frontend], Awaitable[None]],
    tokenizer: Any = None,
) -> Served:
    """`info`: what the ranks reported at start-up (context_length, num_slots, vocab_size);
    `tokenizer`: one loaded already (else it is loaded here)."""
    engine = cfg.engine
    tokenizer = tokenizer or load_text(cfg)
    detokenizer = None if tokenizer is None else Detokenizer(tokenizer)
    context, slots = info["context_length"], info["num_slots"]
    model = ModelInfo(
        tokenizer or NoTokenizer(),
        {cfg.model_name, engine.model_path},
        cfg.model_name,
        info["vocab_size"],
        context,
        slots,
        max_prompt_chars(tokenizer, min(context, slots)),
        ImageProcessor.load(engine, cfg.model_name, tokenizer),
    )
    frontend = Frontend(
        ranks, ipc, cfg.max_queued_requests, detokenizer, slots, owner, cfg.stream_interval
    )
    app = build_app(frontend, model, lambda: on_shutdown(frontend), cfg.max_request_body_bytes)
    return Served(frontend, app, model)


LISTEN_BACKLOG = 2048


def bind(host: str, port: int) -> socket.socket:
    """The TCP socket on (host, port) that every front end accepts from, bound as uvicorn binds
    its own (IPv6 for an address with a colon, else IPv4) and not yet listening: bound before
    the ranks start, so that none of their own ports (gloo's, zmq's: the OS hands out the same
    ephemeral range) can take it, while a client is refused, not queued, until the server
    listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def uvicorn_server(cfg: ServerConfig, app: Any, own_signals: bool) -> Any:
    """A uvicorn server for `app`. `own_signals`: the launcher's; on the first SIGINT/SIGTERM it
    calls `on_signal` (the drain) instead of stopping, on a later one `on_stop_now`. It exits
    normally (uvicorn would re-raise them) and keeps both handlers after serving: a signal while
    the ranks stop must not kill the launcher. Other front ends leave signals to the launcher,
    which tells them what to do."""
    import uvicorn

    class Server(uvicorn.Server):
        on_signal: Callable[[], None] | None = None
        on_stop_now: Callable[[], None] | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if own_signals:
                for s in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(s, self.handle_exit)
                if (stop := stop_requested()) is not None:  # a start-up stop whose raise was lost
                    self.handle_exit(signal.Signals[stop], None)
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

    from pipeserve.server.app import direct_routes
    from pipeserve.server.push import with_raw_send

    return Server(
        uvicorn.Config(
            with_raw_send(direct_routes(app)),
            log_level=cfg.engine.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,  # after the drain: for the last answers to go out
        )
    )
