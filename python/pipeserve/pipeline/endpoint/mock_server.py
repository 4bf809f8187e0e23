"""An in-process OpenAI-compatible mock endpoint for benchmarks and tests: a real HTTP/1.1 server
on 127.0.0.1 (asyncio streams, keep-alive) that answers `/completions`, `/chat/completions` and
`GET /models` after a set latency, serving at most `concurrency` requests at once (the rest
wait, as on a server whose batch is full).

    with MockThread(MockConfig(latency_s=0.1, concurrency=8)) as mock:
        run_job(job.with_endpoint_urls({"gen": mock.url}), records, "out.jsonl")

A request takes `latency_s` whatever number of prompts it carries. `reply` decides each answer
from the request body; the default completes each prompt with `answer(prompt)`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A prompt's completion: its text, or (text, finish_reason).
Completion = str | tuple[str, str]
# (status, JSON payload, extra headers) for one request body and its path.
Reply = tuple[int, dict[str, Any], dict[str, str]]


def echo(prompt: str) -> Completion:
    return f"<{prompt}>"


def arithmetic(prompt: str) -> Completion:
    """A model that gets `a+b=` and `a-b=` right (the example job's task); echoes the rest."""
    left, op, right = prompt.rstrip("=").partition("+" if "+" in prompt else "-")
    if not (op and left.strip().lstrip("-").isdigit() and right.strip().isdigit()):
        return echo(prompt)
    return str(int(left) + int(right) if op == "+" else int(left) - int(right))


@dataclass(frozen=True)
class MockConfig:
    latency_s: float = 0.0  # per request
    concurrency: int = 8  # requests served at once
    owned_by: str = "mock"  # what GET /models says serves it
    answer: Callable[[str], Completion] = echo
    capacity: int | None = None  # requests in flight beyond this get a 429 at once


@dataclass
class MockServer:
    config: MockConfig = field(default_factory=MockConfig)
    reply: Callable[[str, dict[str, Any]], Reply] | None = None  # None: `complete`
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every POST body, in arrival order
    url: str = ""  # base URL, .../v1, once started
    _server: asyncio.Server | None = None
    _slots: asyncio.Semaphore | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _active: int = 0  # POSTs being served
    overloads: int = 0  # 429s sent for `capacity`

    async def start(self, port: int = 0) -> str:
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
        return self.url

    async def stop(self) -> None:
        """Closes the listening socket and every open connection."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            while (request := await _read_request(reader)) is not None:
                method, path, body = request
                status, payload, headers = await self._answer(method, path, body)
                _write_response(writer, status, payload, headers)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def _answer(self, method: str, path: str, body: bytes) -> Reply:
        if method == "GET" and path.endswith("/models"):
            return 200, {"data": [{"id": "mock", "owned_by": self.config.owned_by}]}, {}
        if method != "POST":
            return 404, {"error": {"message": f"no route {method} {path}"}}, {}
        request = json.loads(body)
        self.bodies.append(request)
        if self.config.capacity is not None and self._active >= self.config.capacity:
            self.overloads += 1
            return 429, {"error": {"message": "over capacity"}}, {"Retry-After": "0"}
        assert self._slots is not None
        self._active += 1
        try:
            async with self._slots:
                await asyncio.sleep(self.config.latency_s)
        finally:
            self._active -= 1
        return (self.reply or self.complete)(path, request)

    def complete(self, path: str, request: dict[str, Any]) -> Reply:
        """The OpenAI answer to a completions or chat request, each prompt by `answer`."""
        chat = path.endswith("/chat/completions")
        prompts = [request["messages"][-1]["content"]] if chat else request["prompt"]
        prompts = prompts if isinstance(prompts, list) else [prompts]
        choices, used = [], 0
        for i, prompt in enumerate(prompts):
            done = self.config.answer(prompt)
            text, reason = (done, "stop") if isinstance(done, str) else done
            used += len(text.split())
            content = (
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            choices.append({"index": i, "finish_reason": reason, **content})
        words = sum(len(p.split()) for p in prompts)
        usage = {"prompt_tokens": words, "completion_tokens": used, "total_tokens": words + used}
        return 200, {"object": "text_completion", "choices": choices, "usage": usage}, {}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:  # the client closed the connection
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), 0))
    return method, path, await reader.readexactly(length)


def _write_response(
    writer: asyncio.StreamWriter, status: int, payload: dict[str, Any], headers: dict[str, str]
) -> None:
    data = json.dumps(payload).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n{extra}\r\n".encode()
        + data
    )


class MockThread:
    """`MockServer`s on an event loop of their own thread, so that a caller's `asyncio.run`
    (or blocking code) can use them; `servers[i].url` once entered."""

    def __init__(self, *configs: MockConfig) -> None:
        self.servers = [MockServer(c) for c in configs or (MockConfig(),)]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.servers[0].url

    def call(self, coroutine: Any) -> Any:
        """Runs a coroutine on the servers' loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def __enter__(self) -> MockThread:
        self._thread.start()
        for server in self.servers:
            self.call(server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            if server._server is not None and server._server.is_serving():
                self.call(server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
