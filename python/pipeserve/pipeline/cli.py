"""`python -m pipeserve.pipeline run JOB.yaml --input records.jsonl --output out.jsonl`

Exit status: 0 when every cell is done, 1 when some cell failed (its error is in the output;
run the same command again to retry those cells), 2 for a job or input that cannot run.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeserve.pipeline.config import Job, JobError, LLMColumn
from pipeserve.pipeline.io import check_records, read_records
from pipeserve.pipeline.jobfile import load_job
from pipeserve.pipeline.runner import run_job


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        job = load_job(args.job).with_endpoint_urls(dict(args.endpoint))
        if args.command == "check":
            if args.input:
                check_records(job, read_records(args.input))
            print(describe(job))
            return 0
        summary = run_job(
            job, args.input, args.output, progress=not args.no_progress, compact=args.compact
        )
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
    return 1 if summary.cells_failed else 0


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
            kind = "python"
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
    run.add_argument("--output", required=True, help="JSON lines, appended; resumed if present")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--compact", action="store_true", help="at the end, keep one line per record, input order"
    )
    run.add_argument("--summary-json", help="also write the run's summary here")
    return p
