"""The load generator of bench_serving.py: one asyncio loop and HTTP client per process.

`run_point` spreads one point (its prompts and its concurrency, or its request rate) over N spawned
processes, starts them together behind a barrier and gathers their samples. Output tokens come from
the server's `usage` (the last chunk of a stream with `stream_options.include_usage`, or the body
of a non-streaming reply), never from counting chunks.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import queue
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier
from urllib.parse import urlsplit

from tqdm import tqdm

from proc_cpu import self_cpu_s


@dataclass(frozen=True)
class ClientOptions:
    url: str
    model: str | None
    output_len: int
    ignore_eos: bool
    stream: bool
    timeout: float


@dataclass(frozen=True)
class Sample:
    ttft: float | None  # None when not streaming: no first chunk to time
    latency: float
    output_tokens: int | None  # None: the server sent no usage

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Share:
    """One process's part of a point: its prompts, and its concurrency or request rate."""

    prompts: list[str]
    concurrency: int | None
    rate: float | None


@dataclass(frozen=True)
class ShareResult:
    samples: list[Sample]
    errors: int
    first_error: str | None  # what the first failed request saw
    start: float  # time.monotonic(): one clock for every process of the host
    end: float
    cpu_s: float  # this client process's own CPU over its share


def request_body(prompt: str, opts: ClientOptions) -> dict:
    body: dict = {"prompt": prompt, "max_tokens": opts.output_len, "temperature": 0}
    if opts.stream:  # stream_options is refused without stream (as OpenAI)
        body.update(stream=True, stream_options={"include_usage": True})
    if opts.model:
        body["model"] = opts.model
    if opts.ignore_eos:
        body["ignore_eos"] = True
    return body


class HttpError(Exception):
    """A request that got no complete 2xx answer (a refused connection, a non-2xx status, a cut
    stream, a timeout): counted as an error of its point."""


class Stale(HttpError):
    """A kept-alive connection that the server had closed before this request's answer began
    (an idle timeout): the request is sent again on a new connection."""


class Answer(asyncio.Protocol):
    """Reads HTTP/1.1 answers off one connection as bytes arrive (no task wakes per read): the
    head, then a Content-Length or chunked body whose data goes to the request's `on_data`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.done: asyncio.Future | None = None  # the request in flight: whether to keep alive
        self.on_data: Callable[[bytes], None] = lambda _: None
        self.status, self.keep, self.chunked, self.left = 0, True, False, -1  # left: head unread
        self.started = False  # a byte of the current answer has arrived
        self.error_body: list[bytes] = []  # a non-2xx answer's body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def begin(self, on_data: Callable[[bytes], None]) -> asyncio.Future:
        self.on_data, self.left, self.started, self.error_body = on_data, -1, False, []
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def data_received(self, data: bytes) -> None:
        self.started = True
        self.buf += data
        try:
            self._parse()
        except ValueError as e:
            self._end(HttpError(f"malformed answer: {e}"))

    def _parse(self) -> None:
        while self.done is not None and not self.done.done():
            if self.left < 0:  # the head
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(self.buf[:end].decode("latin-1").split("\r\n"))
                self.buf = self.buf[end + 4 :]
            elif not self.chunked:
                if len(self.buf) < self.left:
                    return
                self.on_data(self.buf[: self.left])
                self.buf = self.buf[self.left :]
                self._end(None)
            else:  # chunk: size in hex CRLF, data CRLF; a zero size ends the body
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(self.buf[:nl].split(b";")[0], 16)
                end = nl + 2 + size + 2
                if len(self.buf) < end:
                    return
                if size:
                    self.on_data(self.buf[nl + 2 : nl + 2 + size])
                self.buf = self.buf[end:]
                if not size:
                    self._end(None)

    def _head(self, lines: list[str]) -> None:
        self.status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self.keep = headers.get("connection") != "close"
        self.chunked = headers.get("transfer-encoding") == "chunked"
        self.left = 0 if self.chunked else int(headers.get("content-length", "0"))
        if not 200 <= self.status < 300:
            self.on_data = self.error_body.append

    def _end(self, error: BaseException | None) -> None:
        if self.done is None or self.done.done():
            return
        if error is None and not 200 <= self.status < 300:
            body = b"".join(self.error_body)[:200]
            error = HttpError(f"HTTP {self.status}: {body!r}")
        if error is None:
            self.done.set_result(self.keep)
        else:
            self.done.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep = False
        if self.started:
            self._end(HttpError("the server closed the connection mid-answer"))
        else:
            self._end(Stale("the server had closed the kept-alive connection"))


class Connection:
    """One keep-alive HTTP/1.1 connection with just enough of the protocol for the benchmark:
    POST a JSON body, read the answer. A streamed answer is handed on as its SSE events' data,
    parsed no further than needed: the client's cost per token is a buffer scan in a protocol
    callback, so that a few client processes can load a server streaming tens of thousands of
    tokens/s."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.answer: Answer | None = None

    async def post(self, path: str, body: bytes, on_data: Callable[[bytes], None]) -> bool:
        """POSTs `body`; the answer's body goes to `on_data`; whether the connection may be kept.
        A non-2xx status raises HttpError once its body has been read."""
        async with asyncio.timeout(self.timeout):
            if self.answer is None:
                loop = asyncio.get_running_loop()
                _, self.answer = await loop.create_connection(Answer, self.host, self.port)
            head = (
                f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            )
            done = self.answer.begin(on_data)
            if self.answer.transport is None or self.answer.transport.is_closing():
                raise Stale("the kept-alive connection is closed")
            self.answer.transport.write(head.encode() + body)
            return await done

    def close(self) -> None:
        if self.answer is not None and self.answer.transport is not None:
            self.answer.transport.close()
        self.answer = None


class Pool:
    """Idle keep-alive connections to one server, reused in turn."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix, self.timeout = parts.path.rstrip("/"), timeout
        self.idle: list[Connection] = []

    async def post(self, path: str, body: dict, on_data: Callable[[bytes], None]) -> None:
        data, reused = json.dumps(body).encode(), bool(self.idle)
        conn = self.idle.pop() if reused else Connection(self.host, self.port, self.timeout)
        try:
            await self._send(conn, self.prefix + path, data, on_data)
        except Stale:
            if not reused:
                raise
            conn = Connection(self.host, self.port, self.timeout)
            await self._send(conn, self.prefix + path, data, on_data)

    async def _send(
        self, conn: Connection, path: str, data: bytes, on_data: Callable[[bytes], None]
    ) -> None:
        try:
            keep = await conn.post(path, data, on_data)
        except BaseException:
            conn.close()
            raise
        if keep:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class StreamReading:
    """A streamed answer's SSE events as they arrive: the time of the first one that carries
    text (TTFT), and the usage of the one that has it. Only those events are parsed."""

    def __init__(self, start: float) -> None:
        self.start, self.pending = start, b""
        self.ttft: float | None = None
        self.tokens: int | None = None

    def __call__(self, data: bytes) -> None:
        self.pending += data
        *events, self.pending = self.pending.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue  # [DONE], comments
            if self.ttft is None and b'"text":""' not in event and has_text(event):
                self.ttft = time.perf_counter() - self.start
            if b'"usage"' in event:
                usage = json.loads(event[6:]).get("usage") or {}
                self.tokens = usage.get("completion_tokens", self.tokens)


def has_text(event: bytes) -> bool:
    choices = json.loads(event[6:]).get("choices") or [{}]
    return bool(choices[0].get("text"))


async def one_request(pool: Pool, prompt: str, opts: ClientOptions) -> Sample:
    body, start = request_body(prompt, opts), time.perf_counter()
    if not opts.stream:
        parts: list[bytes] = []
        await pool.post("/v1/completions", body, parts.append)
        usage = json.loads(b"".join(parts)).get("usage") or {}
        return Sample(None, time.perf_counter() - start, usage.get("completion_tokens"))
    reading = StreamReading(start)
    await pool.post("/v1/completions", body, reading)
    return Sample(reading.ttft, time.perf_counter() - start, reading.tokens)


async def run_share(share: Share, opts: ClientOptions, done: Synchronized | None) -> ShareResult:
    limit = asyncio.Semaphore(share.concurrency or max(1, len(share.prompts)))
    rng, errors, first_error = random.Random(1), 0, None
    pool = Pool(opts.url, opts.timeout)

    async def guarded(p: str) -> Sample | None:
        nonlocal errors, first_error
        async with limit:
            try:
                return await one_request(pool, p, opts)
            except (HttpError, OSError, ValueError, TimeoutError) as e:
                errors += 1
                first_error = first_error or f"{type(e).__name__}: {e}"
                return None
            finally:
                if done is not None:
                    with done.get_lock():
                        done.value += 1

    cpu0, start, tasks = self_cpu_s(), time.monotonic(), []
    try:
        for p in share.prompts:
            tasks.append(asyncio.create_task(guarded(p)))
            if share.rate:
                await asyncio.sleep(rng.expovariate(share.rate))
        samples = [s for s in await asyncio.gather(*tasks) if s is not None]
        end = time.monotonic()
    finally:
        pool.close()
    return ShareResult(samples, errors, first_error, start, end, self_cpu_s() - cpu0)


def _worker(
    share: Share, opts: ClientOptions, barrier: Barrier, done: Synchronized, out: mp.Queue
) -> None:
    barrier.wait()  # every process imported and ready: the point starts for all at once
    out.put(asyncio.run(run_share(share, opts, done)))


def split(
    prompts: list[str], concurrency: int | None, rate: float | None, procs: int
) -> list[Share]:
    """Contiguous slices of the prompts, each sized to its process's part of the concurrency (at
    most one process per concurrent request) or, by rate, an equal part of the Poisson arrivals."""
    if concurrency is None:
        return [Share(prompts[i::procs], None, rate / procs) for i in range(procs)]  # type: ignore[operator]
    n = min(procs, concurrency)
    parts = [concurrency // n + (i < concurrency % n) for i in range(n)]
    bounds = [len(prompts) * sum(parts[:i]) // concurrency for i in range(n + 1)]
    return [Share(prompts[bounds[i] : bounds[i + 1]], parts[i], None) for i in range(n)]


@dataclass(frozen=True)
class PointRun:
    results: list[ShareResult]
    wall_s: float  # first process's start to last process's end


def run_point(
    shares: list[Share], opts: ClientOptions, label: str, on_start: Callable[[], None]
) -> PointRun:
    """Runs the shares in one spawned process each; `on_start()` is called as they are released."""
    ctx = mp.get_context("spawn")
    barrier, done, out = ctx.Barrier(len(shares) + 1), ctx.Value("i", 0), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(s, opts, barrier, done, out)) for s in shares]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    on_start()
    results = _gather(out, procs, done, sum(len(s.prompts) for s in shares), label)
    for p in procs:
        p.join()
    return PointRun(results, max(r.end for r in results) - min(r.start for r in results))


def _gather(
    out: mp.Queue, procs: list[BaseProcess], done: Synchronized, total: int, label: str
) -> list[ShareResult]:
    results: list[ShareResult] = []
    with tqdm(total=total, desc=label, leave=False) as bar:
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=0.5))
            except queue.Empty:  # a chance to update the bar and to see a dead worker
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a client process died") from None
            bar.update(done.value - bar.n)
    return results


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def summarize(run: PointRun) -> dict:
    """Throughput and latency of one point, over the samples of every process."""
    samples = [s for r in run.results for s in r.samples]
    ttft = [s.ttft * 1e3 for s in samples if s.ttft is not None]
    tpot = [s.tpot * 1e3 for s in samples if s.tpot is not None]
    out_tokens = sum(s.output_tokens or 0 for s in samples)
    row = {
        "requests": len(samples),
        "errors": sum(r.errors for r in run.results),
        "first_error": next((r.first_error for r in run.results if r.first_error), None),
        "missing_usage": sum(s.output_tokens is None for s in samples),
        "output_tokens": out_tokens,
        "wall_s": run.wall_s,
        "req_per_s": len(samples) / run.wall_s,
        "output_tok_per_s": out_tokens / run.wall_s,
        "client_cpu_s": [r.cpu_s for r in run.results],
        "client_cpu_pct_max": max(100 * r.cpu_s / (r.end - r.start) for r in run.results),
    }
    for name, vals in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        row[f"{name}_p50"] = statistics.median(vals) if vals else float("nan")
        row[f"{name}_p90"] = pct(vals, 0.9)
        row[f"{name}_p99"] = pct(vals, 0.99)
    return row
