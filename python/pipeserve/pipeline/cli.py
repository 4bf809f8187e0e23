"""`python -m pipeserve.pipeline run JOB.yaml --input records.jsonl --output out.jsonl`

Exit status: 0 when every cell is done, 1 when some cell failed or the run stopped early on its
error rate (errors are in the output; run the same command again to retry those cells and finish
the rest), 2 for a job or input that cannot run, 130 after Ctrl-C (a second Ctrl-C quits at
once). `--preview N` runs the first N records into a temporary file and prints them as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
from typing import Any

from pipeserve.pipeline.io import check_records, read_records
from pipeserve.pipeline.job.config import Job, JobError, LLMColumn
from pipeserve.pipeline.job.jobfile import load_job
from pipeserve.pipeline.runner import run_job_async
from pipeserve.pipeline.stats import RunSummary

PREVIEW_WIDTH = 28  # characters per table cell


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        job = load_job(args.job).with_endpoint_urls(dict(args.endpoint))
        if args.command == "check":
            if args.input:
                check_records(job, read_records(args.input))
            print(describe(job))
            return 0
        if args.preview is not None:
            return preview(job, args)
        if args.output is None:
            raise JobError("--output is required (or --preview N)")
        summary = asyncio.run(_run(job, args, args.output, args.limit))
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an input that cannot be read, an output that cannot be written
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(summary.format())
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary.to_dict(), f, indent=2)
    return exit_status(summary)


def exit_status(summary: RunSummary) -> int:
    if summary.stopped == "interrupted":
        return 130
    return 1 if summary.cells_failed or summary.stopped else 0


async def _run(job: Job, args: argparse.Namespace, output: str, limit: int | None) -> RunSummary:
    """The run, with Ctrl-C wired to an orderly stop (summary, resume hint) the first time."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def interrupted() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C raises KeyboardInterrupt

    loop.add_signal_handler(signal.SIGINT, interrupted)
    progress = not args.no_progress and args.preview is None
    return await run_job_async(
        job, args.input, output, progress=progress, compact=args.compact, limit=limit, stop=stop
    )


def preview(job: Job, args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        output = f"{tmp}/preview.jsonl"
        summary = asyncio.run(_run(job, args, output, args.preview))
        with open(output) as f:
            rows = sorted((json.loads(line) for line in f), key=lambda r: r["_index"])
    print(table(rows, [c.name for c in job.columns]))
    print(summary.format())
    return exit_status(summary)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as a text table: the record's fields, then the columns; long values are cut."""
    fields = [k for r in rows for k in r if k not in columns and not k.startswith("_")]
    names = [*dict.fromkeys(fields), *columns]

    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        text = text.replace("\n", " ")
        return text if len(text) <= PREVIEW_WIDTH else text[: PREVIEW_WIDTH - 3] + "..."

    body = [[cell(r.get(n)) if n not in r.get("_errors", {}) else "ERROR" for n in names]
            for r in rows]  # fmt: skip
    widths = [max(len(n), *(len(b[i]) for b in body)) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    errors = [
        f"record {r['_index']}: {k}: {e}" for r in rows for k, e in r.get("_errors", {}).items()
    ]
    return "\n".join(lines + errors)


def describe(job: Job) -> str:
    """The columns in run order, with what each reads and the priority its requests carry."""
    graph = job.graph
    lines = []
    for name in graph.order:
        col = job.column(name)
        reads = ", ".join((*graph.inputs[name], *graph.field_refs[name])) or "-"
        if isinstance(col, LLMColumn):
            kind = f"{col.api} on {', '.join(col.endpoints)}, priority {graph.priority[name]}"
        else:
            kind = "python" if col.validates is None else f"python, validates {col.validates}"
        lines.append(f"{name}: depth {graph.depth[name]}, {kind}, reads {reads}")
    return "\n".join(lines)


def _endpoint_url(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"expected NAME=URL, got {text!r}")
    return name, url


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeserve.pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (resumes an existing output file)")
    check = sub.add_parser("check", help="validate a job (and records) without running it")
    for s in (run, check):
        s.add_argument("job", help="job YAML file")
        s.add_argument(
            "--endpoint",
            action="append",
            type=_endpoint_url,
            default=[],
            metavar="NAME=URL",
            help="replace an endpoint's base_url (repeatable)",
        )
    check.add_argument("--input", help="records (JSON lines) to check against the job")
    run.add_argument("--input", required=True, help="records, one JSON object per line")
    run.add_argument("--output", help="JSON lines, appended; resumed if present")
    run.add_argument("--limit", type=int, metavar="N", help="only the first N records")
    run.add_argument(
        "--preview", type=int, metavar="N", help="run the first N records and print them"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--compact", action="store_true", help="at the end, keep one line per record, input order"
    )
    run.add_argument("--summary-json", help="also write the run's summary here")
    return p
