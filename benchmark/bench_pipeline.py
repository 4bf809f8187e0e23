"""Pipeline dispatch benchmark: the example job (examples/pipeline: `sum` on server A, `check` on
server B, a Python `verified`) over N records, in three modes against the same two servers:

- runner:   pipeserve.pipeline (incremental frontier, event-driven workers, downstream first);
- column:   column by column (every `sum`, then every `check`), same client and limits;
- snapshot: the NeMo Data Designer bug: a loop takes a snapshot of the ready cells and walks it,
            blocking on the endpoint's semaphore, so cells that become ready meanwhile wait until
            the snapshot is exhausted.

All three share the frontier (dependency tracking), the HTTP client and the per-endpoint limits;
only the dispatch order differs. It reports wall time, the share of generator requests finished
when the first judge request started, records finished over time; prints a table, writes JSON
(and a PNG when matplotlib is installed).

    python benchmark/bench_pipeline.py --records 2000 --json docs/results/pipeline_cpu.json \\
        --plot docs/results/pipeline_cpu.png
    python benchmark/bench_pipeline.py --url-a http://127.0.0.1:30001/v1 --url-b http://127.0.0.1:30002/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "examples", "pipeline"))

from make_records import make_records  # noqa: E402

from pipeserve.pipeline import Job, load_job, run_job_async  # noqa: E402
from pipeserve.pipeline.client import CellError, EndpointClient  # noqa: E402
from pipeserve.pipeline.config import LLMColumn, PythonColumn  # noqa: E402
from pipeserve.pipeline.frontier import PYTHON_LANE, Cell, Frontier  # noqa: E402
from pipeserve.pipeline.io import plan_records  # noqa: E402
from pipeserve.pipeline.stats import RequestSpan  # noqa: E402
from pipeserve.pipeline.template import render  # noqa: E402

GENERATOR, JUDGE = "sum", "check"


class Baseline:
    """Frontier bookkeeping, requests and timing shared by the two baseline dispatchers."""

    def __init__(self, job: Job, records: list[dict]) -> None:
        self.job = job
        self.frontier = Frontier(job, plan_records(job, records, {}))
        self.clients = {e.name: EndpointClient(e, job.retry) for e in job.endpoints}
        self.limits = {e.name: asyncio.Semaphore(e.max_concurrency) for e in job.endpoints}
        self.spans: list[RequestSpan] = []
        self.record_end_s: list[float] = []
        self.values: dict[int, dict] = {}
        self.changed = asyncio.Event()
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def run_cell(self, cell: Cell) -> None:
        """Sends one LLM cell (its endpoint slot already held), resolves it, releases the slot."""
        column = self.job.column(cell.column)
        assert isinstance(column, LLMColumn)
        prompt = render(column.prompt, self.frontier.row(cell))
        start, value, error = self.now(), None, None
        try:
            out = await self.clients[column.endpoint].generate(
                column, prompt, self.job.graph.priority[column.name]
            )
            value = out.text
        except CellError as e:
            error = str(e)
        finally:
            self.limits[column.endpoint].release()
        self.spans.append(
            RequestSpan(column.name, column.endpoint, cell.record, start, self.now(), not error)
        )
        self.frontier.resolve(cell, value, error)
        self.settle()

    def settle(self) -> None:
        while (cell := self.frontier.pop(PYTHON_LANE)) is not None:
            column = self.job.column(cell.column)
            assert isinstance(column, PythonColumn)
            self.frontier.resolve(cell, column.function(self.frontier.row(cell)))
        for record in self.frontier.completed:
            self.values[record] = self.frontier.result(record)[0]
            self.record_end_s.append(self.now())
        self.frontier.completed.clear()
        self.changed.set()

    def pop_all(self, lanes: list[str]) -> list[Cell]:
        cells = []
        for lane in lanes:
            while (cell := self.frontier.pop(lane)) is not None:
                cells.append(cell)
        return cells

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients.values()))


async def column_by_column(base: Baseline) -> None:
    """Every cell of one LLM column, then the next column (barrier in between)."""
    for name in base.job.graph.order:
        column = base.job.column(name)
        if not isinstance(column, LLMColumn):
            continue
        tasks = []
        for cell in base.pop_all([column.endpoint]):
            await base.limits[column.endpoint].acquire()
            tasks.append(asyncio.create_task(base.run_cell(cell)))
        await asyncio.gather(*tasks)


async def snapshot_dispatch(base: Baseline) -> None:
    """The bug: walk a snapshot of the ready cells, blocking on each cell's endpoint semaphore;
    only when the snapshot is exhausted look at the ready set again."""
    lanes = [e.name for e in base.job.endpoints]
    tasks: list[asyncio.Task] = []
    while not base.frontier.done:
        base.changed.clear()
        snapshot = base.pop_all(lanes)
        for cell in snapshot:
            await base.limits[base.frontier.lane_of(cell.column)].acquire()
            tasks.append(asyncio.create_task(base.run_cell(cell)))
        if not snapshot:
            await base.changed.wait()
    await asyncio.gather(*tasks)


async def run_mode(mode: str, job: Job, records: list[dict]) -> dict:
    if mode == "runner":
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.jsonl")
            summary = await run_job_async(job, records, out)
            with open(out) as f:
                verified = sum(json.loads(line)["verified"] is True for line in f)
        return measure(mode, summary.wall_s, summary.requests, summary.record_end_s, verified)
    base = Baseline(job, records)
    dispatch: Callable = column_by_column if mode == "column" else snapshot_dispatch
    try:
        await dispatch(base)
    finally:
        await base.close()
    verified = sum(v.get("verified") is True for v in base.values.values())
    return measure(mode, base.now(), base.spans, base.record_end_s, verified)


def measure(
    mode: str, wall: float, spans: list[RequestSpan], ends: list[float], verified: int
) -> dict:
    gen_ends = sorted(s.end_s for s in spans if s.column == GENERATOR)
    first_judge = min(s.start_s for s in spans if s.column == JUDGE)
    ends = sorted(ends)
    return {
        "mode": mode,
        "wall_s": wall,
        "records": len(ends),
        "verified": verified,
        "failed_requests": sum(not s.ok for s in spans),
        "first_judge_start_s": first_judge,
        "gen_done_at_first_judge": sum(t <= first_judge for t in gen_ends) / len(gen_ends),
        "first_record_s": ends[0] if ends else None,
        "half_records_s": ends[len(ends) // 2] if ends else None,
        "record_end_s": ends,
    }


def launch(flags: str) -> tuple[subprocess.Popen, str]:
    from pipeserve.utils import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "pipeserve.launch_server", "--port", str(port)]
    proc = subprocess.Popen([*cmd, *shlex.split(flags)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server '{flags}' exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, f"{url}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server '{flags}' not ready in 300 s")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        ends = row["record_end_s"]
        ax.step([0, *ends], range(len(ends) + 1), where="post", label=row["mode"])
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("records finished")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(rows: list[dict]) -> str:
    column = next(r for r in rows if r["mode"] == "column")["wall_s"]
    lines = [
        "| mode | wall (s) | vs column | gen done at 1st judge | 1st record (s) | half records (s) | verified |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['wall_s']:.1f} | {column / r['wall_s']:.2f}x "
            f"| {r['gen_done_at_first_judge']:.1%} | {r['first_record_s']:.2f} "
            f"| {r['half_records_s']:.1f} | {r['verified']}/{r['records']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--url-a", help="server A (generator) base URL, .../v1; default: start one")
    p.add_argument("--url-b", help="server B (judge) base URL, .../v1; default: start one")
    p.add_argument("--flags-a", default="--device cpu", help="flags when starting server A")
    p.add_argument("--flags-b", default="--device cpu --pp-size 2", help="flags for server B")
    p.add_argument("--concurrency", type=int, default=None, help="per endpoint (default: job's)")
    p.add_argument("--modes", default="runner,column,snapshot")
    p.add_argument("--json", help="write results here")
    p.add_argument("--plot", help="PNG of records finished over time (needs matplotlib)")
    args = p.parse_args()
    procs = []
    try:
        urls = {}
        for name, url, flags in (("adder", args.url_a, args.flags_a), ("checker", args.url_b, args.flags_b)):
            if url is None:
                proc, url = launch(flags)
                procs.append(proc)
            urls[name] = url
        job = load_job(os.path.join(ROOT, "examples", "pipeline", "job.yaml")).with_endpoint_urls(urls)
        if args.concurrency:
            endpoints = tuple(replace(e, max_concurrency=args.concurrency) for e in job.endpoints)
            job = Job(endpoints, job.columns, job.retry, job.fields)
        records = make_records(args.records, seed=0)
        asyncio.run(run_mode("runner", job, records[:64]))  # warm-up
        rows = []
        for mode in args.modes.split(","):
            rows.append(asyncio.run(run_mode(mode, job, records)))
            print(f"{mode}: {rows[-1]['wall_s']:.1f} s", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
    print(table(rows))
    meta = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "concurrency": {e.name: e.max_concurrency for e in job.endpoints},
        "server_flags": {"adder": args.flags_a if args.url_a is None else args.url_a, "checker": args.flags_b if args.url_b is None else args.url_b},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
    if args.plot:
        try:
            plot(rows, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
