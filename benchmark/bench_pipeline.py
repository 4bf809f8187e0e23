"""Pipeline dispatch benchmark: the example job (examples/pipeline: `sum` on server A, `check` on
server B, a Python `verified`) over N records, in three modes against the same two servers:

- runner:   pipeserve.pipeline (incremental frontier, event-driven workers, downstream first);
- column:   column by column (every `sum`, then every `check`), same client and limits;
- snapshot: the NeMo Data Designer bug: a loop takes a snapshot of the ready cells and walks it,
            blocking on the endpoint's semaphore, so cells that become ready meanwhile wait until
            the snapshot is exhausted.

All three share the frontier, the HTTP client, the per-endpoint limits and the prompts per
request; only the dispatch order differs. Each mode runs over records no earlier mode sent (its
own seed), so that every mode meets the servers' prefix caches alike. It reports wall time, when
the first judge request started, records finished over time, each server's and the client's CPU
time and how each server batched (its /metrics); prints tables, writes JSON (and a PNG).

    python benchmark/bench_pipeline.py --records 2000 --cpus-a 0 --cpus-b 1 --json out.json
    python benchmark/bench_pipeline.py --mock  # A, B: in-process mocks (mock_server.py), no model
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "examples", "pipeline"))

from make_records import make_records  # noqa: E402

from launched_server import LaunchedServer  # noqa: E402
from pipeserve.pipeline import Job, load_job, run_job_async  # noqa: E402
from pipeserve.pipeline.endpoint.client import CellError, EndpointClient  # noqa: E402
from pipeserve.pipeline.endpoint.mock_server import MockConfig, MockThread, arithmetic  # noqa: E402
from pipeserve.pipeline.frontier import PYTHON_LANE, Cell, Frontier  # noqa: E402
from pipeserve.pipeline.io import plan_records  # noqa: E402
from pipeserve.pipeline.job.config import LLMColumn, PythonColumn  # noqa: E402
from pipeserve.pipeline.job.template import render  # noqa: E402
from pipeserve.pipeline.stats import RequestSpan  # noqa: E402
from proc_cpu import self_cpu_s  # noqa: E402

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

    async def run_cells(self, cells: list[Cell]) -> None:
        """Sends cells of one LLM column in one request (its slot held), resolves them."""
        column = self.job.column(cells[0].column)
        assert isinstance(column, LLMColumn)
        prompts = [render(column.prompt, self.frontier.row(c)) for c in cells]
        start, priority = self.now(), self.job.graph.priority[column.name]
        try:
            answer = await self.clients[column.endpoint].generate(column, prompts, priority)
        finally:
            self.limits[column.endpoint].release()
        end = self.now()
        for cell, result in zip(cells, answer.results, strict=True):
            ok = not isinstance(result, CellError)
            self.spans.append(
                RequestSpan(column.name, column.endpoint, cell.record, start, end, ok)
            )
            self.frontier.resolve(cell, result.text if ok else None, None if ok else str(result))
        self.settle()

    def batches(self, cells: list[Cell]) -> list[list[Cell]]:
        """Consecutive cells of one column, cut at the endpoint's max_batch_size (as sent)."""
        out: list[list[Cell]] = []
        for cell in cells:
            limit = self.job.endpoint(self.frontier.lanes_of(cell.column)[0]).max_batch_size
            if out and out[-1][0].column == cell.column and len(out[-1]) < limit:
                out[-1].append(cell)
            else:
                out.append([cell])
        return out

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
        return [c for lane in lanes for c in iter(lambda lane=lane: self.frontier.pop(lane), None)]

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients.values()))


async def column_by_column(base: Baseline) -> None:
    """Every cell of one LLM column, then the next column (barrier in between)."""
    for name in base.job.graph.order:
        column = base.job.column(name)
        if not isinstance(column, LLMColumn):
            continue
        tasks = []
        for cells in base.batches(base.pop_all([column.endpoint])):
            await base.limits[column.endpoint].acquire()
            tasks.append(asyncio.create_task(base.run_cells(cells)))
        await asyncio.gather(*tasks)


async def snapshot_dispatch(base: Baseline) -> None:
    """The bug: walk a snapshot of the ready cells, blocking on each cell's endpoint semaphore;
    only when the snapshot is exhausted look at the ready set again."""
    lanes = [e.name for e in base.job.endpoints]
    tasks: list[asyncio.Task] = []
    while not base.frontier.done:
        base.changed.clear()
        snapshot = base.pop_all(lanes)
        for cells in base.batches(snapshot):
            await base.limits[base.frontier.lanes_of(cells[0].column)[0]].acquire()
            tasks.append(asyncio.create_task(base.run_cells(cells)))
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
        "mode": mode, "wall_s": wall, "records": len(ends), "verified": verified,
        "failed_requests": sum(not s.ok for s in spans), "first_judge_start_s": first_judge,
        **judge_load([s for s in spans if s.column == JUDGE]),
        "gen_done_at_first_judge": sum(t <= first_judge for t in gen_ends) / len(gen_ends),
        "first_record_s": ends[0] if ends else None,
        "half_records_s": ends[len(ends) // 2] if ends else None,
        "record_end_s": [round(t, 3) for t in ends],
    }  # fmt: skip


def judge_load(spans: list[RequestSpan]) -> dict[str, float]:
    """From the first judge request to the last answer: the judge's prompts in flight on average
    and the seconds with none in flight (its server idle for want of work)."""
    events = sorted([(s.start_s, 1) for s in spans] + [(s.end_s, -1) for s in spans])
    in_flight, last, area, idle = 0, events[0][0], 0.0, 0.0
    for t, step in events:
        area, idle = area + in_flight * (t - last), idle + (t - last) * (in_flight == 0)
        in_flight, last = in_flight + step, t
    return {"judge_in_flight": area / max(last - events[0][0], 1e-9), "judge_idle_s": idle}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="tight")
    for ends, mode in ((r["record_end_s"], r["mode"]) for r in rows if r["run"] == 0):
        ax.step([0, *ends], range(len(ends) + 1), where="post", label=mode)
    ax.set(xlabel="seconds since start", ylabel="records finished")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


def table(rows: list[dict]) -> str:
    """Two tables, a line per run and then the median of each mode: timing, then how each server
    batched. `column / wall` divides the column-by-column wall time of the same run (modes run
    back to back) by this mode's; the median line gives the median of those ratios."""
    column = {r["run"]: r["wall_s"] for r in rows if r["mode"] == "column"}
    for r in rows:
        r["speedup_vs_column"] = column[r["run"]] / r["wall_s"] if r["run"] in column else None
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    rows = [*rows, *(median(m, [r for r in rows if r["mode"] == m]) for m in modes)]
    head = ["mode", "run", "wall (s)", "column / wall", "gen done at 1st judge", "1st record (s)",
            "half the records (s)", "CPU (s) A / B / client", "load avg", "verified"]  # fmt: skip
    batch_head = ["mode", "run"]
    for n in rows[0]["servers"]:
        batch_head += [f"{n}: CPU / busy (s)", f"{n}: microbatches (tokens each)"]
        batch_head.append(f"{n}: prefix hits")
    batch_head += ["judge prompts in flight", "judge idle (s)"]
    timing = markdown(head, [timing_cells(r) for r in rows])
    return timing + "\n\n" + markdown(batch_head, [batching_cells(r) for r in rows])


def timing_cells(r: dict) -> list[str]:
    speed = f"{r['speedup_vs_column']:.2f}x" if r["speedup_vs_column"] else "-"
    cpu = [*(s["cpu_s"] for s in r["servers"].values()), r["client_cpu_s"]]
    return [r["mode"], str(r["run"]), f"{r['wall_s']:.1f}", speed,
            f"{r['gen_done_at_first_judge']:.1%}", f"{r['first_record_s']:.2f}",
            f"{r['half_records_s']:.1f}", " / ".join(f"{v:.1f}" for v in cpu), r["load"],
            f"{r['verified']:.0f}/{r['records']}"]  # fmt: skip


def batching_cells(r: dict) -> list[str]:
    """Each server's CPU and forward (busy) seconds, its microbatches with the tokens sampled per
    microbatch, the share of prompt tokens found in its prefix cache; then `judge_load`."""
    cells = [r["mode"], str(r["run"])]
    for s in r["servers"].values():
        each = s["tokens"] / max(s["microbatches"], 1)
        hits = s["hit_tokens"] / max(s["prompt_tokens"], 1)
        cells += [f"{s['cpu_s']:.1f} / {s['busy_s']:.1f}", f"{s['microbatches']:.0f} ({each:.1f})"]
        cells.append(f"{hits:.0%}")
    return [*cells, f"{r['judge_in_flight']:.1f}", f"{r['judge_idle_s']:.2f}"]


def markdown(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(line) + " |" for line in [head, ["---"] * len(head), *rows])


def median(mode: str, runs: list[dict]) -> dict:
    """The median of every number of `runs` (of `servers` too); lists are left out."""

    def med(values: list) -> object:
        if isinstance(values[0], dict):
            return {k: med([v[k] for v in values]) for k in values[0]}
        return statistics.median(values) if isinstance(values[0], int | float) else None

    row = {k: med([r[k] for r in runs]) for k in runs[0] if not isinstance(runs[0][k], list)}
    ratios = [r["speedup_vs_column"] for r in runs if r["speedup_vs_column"]]
    row.update(mode=mode, run="median", load="-")
    row["speedup_vs_column"] = statistics.median(ratios) if ratios else None
    return row


def run_all(args: argparse.Namespace, job: Job, servers: dict[str, LaunchedServer]) -> list[dict]:
    """Every mode `args.repeats` times, interleaved, each over records of its own seed (after a
    warm-up over seed 0): a prompt one mode sent would hit the servers' prefix cache in the next,
    so on shared records whichever mode went first ran the only cold pass."""
    asyncio.run(run_mode("runner", job, make_records(args.records, seed=0)))  # warm-up
    rows: list[dict] = []
    for run in range(args.repeats):
        for mode in args.modes.split(","):
            records = make_records(args.records, seed=1 + len(rows))
            before = {n: s.usage() for n, s in servers.items()}
            client0, load0 = self_cpu_s(), os.getloadavg()[0]
            row = asyncio.run(run_mode(mode, job, records))
            row["client_cpu_s"] = self_cpu_s() - client0
            row["load"] = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
            row["run"], row["seed"] = run, 1 + len(rows)
            row["servers"] = {
                n: {k: v - before[n][k] for k, v in s.usage().items()} for n, s in servers.items()
            }
            rows.append(row)
            print(f"{mode} run {run}: {row['wall_s']:.1f} s", flush=True)
    return rows


def example_job(urls: dict[str, str], args: argparse.Namespace) -> Job:
    job = load_job(os.path.join(ROOT, "examples", "pipeline", "job.yaml")).with_endpoint_urls(urls)
    limits = {"max_concurrency": args.concurrency, "max_batch_size": args.batch}
    limits = {k: v for k, v in limits.items() if v}
    endpoints = tuple(replace(e, **limits) for e in job.endpoints)
    return Job(endpoints, job.columns, job.retry, job.fields)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--url-a", help="server A (generator) base URL, .../v1; default: start one")
    p.add_argument("--url-b", help="server B (judge) base URL, .../v1; default: start one")
    p.add_argument("--flags-a", default="--device cpu --cpu-threads 1", help="server A's flags")
    p.add_argument("--flags-b", default="--device cpu --pp-size 2", help="server B's flags")
    p.add_argument("--cpus-a", help="pin server A to these CPUs (taskset -c), e.g. 0")
    p.add_argument("--cpus-b", help="pin server B to these CPUs, e.g. 1")
    p.add_argument("--concurrency", type=int, default=None, help="per endpoint (default: job's)")
    p.add_argument("--batch", type=int, default=None, help="max_batch_size (default: job's)")
    p.add_argument("--mock", action="store_true", help="in-process mock endpoints, no servers")
    p.add_argument("--mock-latency", type=float, default=0.1, help="seconds per mock request")
    p.add_argument("--mock-concurrency", type=int, default=8, help="mock requests served at once")
    p.add_argument("--modes", default="runner,column,snapshot")
    p.add_argument("--repeats", type=int, default=1, help="runs of every mode, interleaved")
    p.add_argument("--json", help="write results here")
    p.add_argument("--plot", help="PNG of records finished over time (needs matplotlib)")
    p.add_argument("--cpus-client", help="pin this process (the client) to these CPUs, e.g. 0")
    args = p.parse_args()
    with endpoints(args) as (urls, servers):
        if args.cpus_client:  # after the servers started: they must not inherit it
            os.sched_setaffinity(0, {int(c) for c in args.cpus_client.split(",")})
        rows = run_all(args, job := example_job(urls, args), servers)
    print(table(rows))
    write_results(args, job, rows)


@contextlib.contextmanager
def endpoints(args: argparse.Namespace) -> Iterator[tuple[dict[str, str], dict]]:
    """A's and B's URLs and the servers started here (stopped on exit), or in-process mocks."""
    if args.mock:
        config = MockConfig(args.mock_latency, args.mock_concurrency, answer=arithmetic)
        with MockThread(config, config) as mock:
            yield {"adder": mock.servers[0].url, "checker": mock.servers[1].url}, {}
        return
    servers: dict[str, LaunchedServer] = {}
    try:
        urls = {"adder": args.url_a, "checker": args.url_b}
        launch = {"adder": (args.flags_a, args.cpus_a), "checker": (args.flags_b, args.cpus_b)}
        for name in [n for n, url in urls.items() if url is None]:
            servers[name] = LaunchedServer(*launch[name])
            urls[name] = servers[name].url + "/v1"
        yield urls, servers
    finally:
        for server in servers.values():
            server.stop()


def write_results(args: argparse.Namespace, job: Job, rows: list[dict]) -> None:
    git = ["git", "rev-parse", "--short", "HEAD"]
    mock = f"mock: {args.mock_latency} s per request, {args.mock_concurrency} at a time"
    launched = {
        "adder": args.url_a or f"{args.flags_a} cpus={args.cpus_a}",
        "checker": args.url_b or f"{args.flags_b} cpus={args.cpus_b}",
        "client": f"cpus={args.cpus_client}",
    }
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "commit": subprocess.run(git, capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "endpoints": {
            e.name: {"max_concurrency": e.max_concurrency, "max_batch_size": e.max_batch_size}
            for e in job.endpoints
        },
        "servers": mock if args.mock else launched,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "table": table(rows), "rows": rows}, f, indent=1)
    if args.plot:
        try:
            plot(rows, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
