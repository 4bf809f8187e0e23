"""The Python entry point: run a job over records into an output file (resuming it)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pipeserve.pipeline.dispatch import Dispatcher
from pipeserve.pipeline.endpoint.client import EndpointClient, priority_order, probe
from pipeserve.pipeline.frontier import Frontier
from pipeserve.pipeline.io import (
    OutputWriter,
    check_records,
    compact_output,
    output_row,
    plan_records,
    read_output,
    read_records,
    record_hashes,
)
from pipeserve.pipeline.job.config import Job, JobError, LLMColumn
from pipeserve.pipeline.stats import RunStats, RunSummary


async def run_job_async(
    job: Job,
    records: str | Sequence[dict[str, Any]],
    output: str,
    *,
    progress: bool = False,
    compact: bool = False,
    limit: int | None = None,
    stop: asyncio.Event | None = None,
) -> RunSummary:
    """Computes every cell not already finished in `output` and appends each record's line as it
    finishes. `records` is a JSON-lines path or a list of dicts; `limit` keeps the first that
    many. With `compact`, the output is rewritten at the end with one line per record, in input
    order. Setting `stop` (the CLI sets it on Ctrl-C) ends the run as an early stop does: the
    summary says so, and a re-run resumes."""
    records = read_records(records) if isinstance(records, str) else list(records)
    records = records[:limit] if limit is not None else records
    check_records(job, records)
    hashes = record_hashes(records)
    plans = plan_records(job, records, read_output(output))
    clients, down = await connect(job, {c for p in plans for c in p.run})
    to_run = {c.name: sum(c.name in p.run for p in plans) for c in job.columns}
    stats = RunStats(to_run, {n: len(records) - k for n, k in to_run.items()}, progress)
    stats.records_skipped = len(records) - len(plans)
    frontier = Frontier(job, plans)
    writer = OutputWriter(output)

    def write_record(record: int) -> None:
        result = frontier.result(record)
        writer.write(output_row(job, record, hashes[record], result, frontier.usage(record)))
        frontier.forget(record)
        stats.record_written()

    generate = {name: client.generate for name, client in clients.items()}
    limits = {name: client.limit for name, client in clients.items()}
    dispatcher = Dispatcher(job, frontier, generate, stats, write_record, down, limits)
    watch = asyncio.create_task(_stop_on(stop, dispatcher)) if stop is not None else None
    try:
        await dispatcher.run()
    finally:
        if watch is not None:
            watch.cancel()
        writer.close()
        await asyncio.gather(*(c.aclose() for c in clients.values()))
        summary = stats.finish(dispatcher.stopped, len(plans) - stats.written)
    if compact:
        compact_output(output, records)
    return summary


async def _stop_on(event: asyncio.Event, dispatcher: Dispatcher) -> None:
    await event.wait()
    dispatcher.stop("interrupted")


async def connect(job: Job, columns: set[str]) -> tuple[dict[str, EndpointClient], dict[str, str]]:
    """Probes the endpoints that `columns` use, before anything is sent: a client per reachable
    endpoint, and the endpoints that could not be reached. Raises `JobError` when a column could
    reach none of its endpoints."""
    llm = [c for c in job.columns if isinstance(c, LLMColumn) and c.name in columns]
    used = [e for e in job.endpoints if any(e.name in c.endpoints for c in llm)]
    found = dict(zip(used, await asyncio.gather(*(probe(e) for e in used)), strict=True))
    down = {e.name: p.problem for e, p in found.items() if not p.reachable}
    for column in llm:
        if all(name in down for name in column.endpoints):
            e = job.endpoint(column.endpoints[0])
            raise JobError(
                f"endpoint {e.name!r} ({e.base_url}) cannot be reached: {down[e.name]}; "
                f"column {column.name!r} has no other endpoint; nothing was sent"
            )
    clients = {
        e.name: EndpointClient(e, job.retry, priority_order(e, p))
        for e, p in found.items()
        if p.reachable
    }
    return clients, down


def run_job(
    job: Job,
    records: str | Sequence[dict[str, Any]],
    output: str,
    *,
    progress: bool = False,
    compact: bool = False,
    limit: int | None = None,
) -> RunSummary:
    """`run_job_async` in a fresh event loop."""
    return asyncio.run(
        run_job_async(job, records, output, progress=progress, compact=compact, limit=limit)
    )
