"""The Python entry point: run a job over records into an output file (resuming it)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pipeserve.pipeline.client import EndpointClient
from pipeserve.pipeline.config import Job
from pipeserve.pipeline.dispatch import Dispatcher
from pipeserve.pipeline.frontier import Frontier
from pipeserve.pipeline.io import (
    OutputWriter,
    check_records,
    compact_output,
    output_row,
    plan_records,
    read_output,
    read_records,
)
from pipeserve.pipeline.stats import RunStats, RunSummary


async def run_job_async(
    job: Job,
    records: str | Sequence[dict[str, Any]],
    output: str,
    *,
    progress: bool = False,
    compact: bool = False,
) -> RunSummary:
    """Computes every cell not already finished in `output` and appends each record's line as it
    finishes. `records` is a JSON-lines path or a list of dicts. With `compact`, the output is
    rewritten at the end with one line per record, in input order."""
    records = read_records(records) if isinstance(records, str) else list(records)
    check_records(job, records)
    plans = plan_records(job, records, read_output(output))
    to_run = {c.name: sum(c.name in p.run for p in plans) for c in job.columns}
    stats = RunStats(to_run, {n: len(records) - k for n, k in to_run.items()}, progress)
    stats.records_skipped = len(records) - len(plans)
    frontier = Frontier(job, plans)
    writer = OutputWriter(output)
    clients = {e.name: EndpointClient(e, job.retry) for e in job.endpoints}

    def write_record(record: int) -> None:
        values, errors = frontier.result(record)
        writer.write(output_row(job, record, values, errors))
        frontier.forget(record)
        stats.record_written()

    generate = {name: client.generate for name, client in clients.items()}
    try:
        await Dispatcher(job, frontier, generate, stats, write_record).run()
    finally:
        writer.close()
        await asyncio.gather(*(c.aclose() for c in clients.values()))
        summary = stats.finish()
    if compact:
        compact_output(output, records)
    return summary


def run_job(
    job: Job,
    records: str | Sequence[dict[str, Any]],
    output: str,
    *,
    progress: bool = False,
    compact: bool = False,
) -> RunSummary:
    """`run_job_async` in a fresh event loop."""
    return asyncio.run(run_job_async(job, records, output, progress=progress, compact=compact))
