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

import httpx
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


async def one_request(http: httpx.AsyncClient, prompt: str, opts: ClientOptions) -> Sample:
    url, body = f"{opts.url}/v1/completions", request_body(prompt, opts)
    start = time.perf_counter()
    if not opts.stream:
        r = await http.post(url, json=body)
        r.raise_for_status()
        usage = r.json().get("usage") or {}
        return Sample(None, time.perf_counter() - start, usage.get("completion_tokens"))
    ttft, tokens = None, None
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if ttft is None and data.get("choices") and data["choices"][0].get("text"):
                ttft = time.perf_counter() - start
    return Sample(ttft, time.perf_counter() - start, tokens)


async def run_share(share: Share, opts: ClientOptions, done: Synchronized | None) -> ShareResult:
    limit = asyncio.Semaphore(share.concurrency or max(1, len(share.prompts)))
    rng, errors = random.Random(1), 0

    async def guarded(http: httpx.AsyncClient, p: str) -> Sample | None:
        nonlocal errors
        async with limit:
            try:
                return await one_request(http, p, opts)
            except httpx.HTTPError:
                errors += 1
                return None
            finally:
                if done is not None:
                    with done.get_lock():
                        done.value += 1

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=opts.timeout, limits=limits) as http:
        cpu0, start, tasks = self_cpu_s(), time.monotonic(), []
        for p in share.prompts:
            tasks.append(asyncio.create_task(guarded(http, p)))
            if share.rate:
                await asyncio.sleep(rng.expovariate(share.rate))
        samples = [s for s in await asyncio.gather(*tasks) if s is not None]
        end = time.monotonic()
    return ShareResult(samples, errors, start, end, self_cpu_s() - cpu0)


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
