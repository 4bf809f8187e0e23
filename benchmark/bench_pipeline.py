"""Pipeline dispatch benchmark: the example job (examples/pipeline: `sum` on server A, `check` on
server B, a Python `verified`) over N records, in three modes against the same two servers:

- runner:   pipeserve.pipeline (incremental frontier, event-driven workers, downstream first);
- column:   column by column (every `sum`, then every `check`), same client and limits;
- snapshot: the NeMo Data Designer bug: a loop takes a snapshot of the ready cells and walks it,
            blocking on the endpoint's semaphore, so cells that become ready meanwhile wait until
            the snapshot is exhausted.

All three share the frontier (dependency tracking), the HTTP client, the per-endpoint limits and
the prompts per request (`max_batch_size`, cut the same way); only the dispatch order differs.
It reports wall time, the share of generator requests finished when the first judge request
started, records finished over time and the CPU time of each server and of the client; prints a
table, writes JSON (and a PNG when matplotlib is installed).

    python benchmark/bench_pipeline.py --records 2000 --json docs/results/pipeline_cpu.json \\
        --plot docs/results/pipeline_cpu.png
    python benchmark/bench_pipeline.py --url-a http://127.0.0.1:30001/v1 --url-b http://127.0.0.1:30002/v1
    python benchmark/bench_pipeline.py --mock  # A, B: in-process mocks (mock_server.py), no model
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "examples", "pipeline"))

from make_records import make_records  # noqa: E402

from pipeserve.pipeline import Job, load_job, run_job_async  # noqa: E402
from pipeserve.pipeline.endpoint.client import CellError, EndpointClient  # noqa: E402
from pipeserve.pipeline.endpoint.mock_server import MockConfig, MockThread, arithmetic  # noqa: E402
from pipeserve.pipeline.frontier import PYTHON_LANE, Cell, Frontier  # noqa: E402
from pipeserve.pipeline.io import plan_records  # noqa: E402
from pipeserve.pipeline.job.config import LLMColumn, PythonColumn  # noqa: E402
from pipeserve.pipeline.job.template import render  # noqa: E402
from pipeserve.pipeline.stats import RequestSpan  # noqa: E402

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
        start = self.now()
        try:
            answer = await self.clients[column.endpoint].generate(
                column, prompts, self.job.graph.priority[column.name]
            )
        finally:
            self.limits[column.endpoint].release()
        for cell, result in zip(cells, answer.results, strict=True):
            ok = not isinstance(result, CellError)
            self.spans.append(
                RequestSpan(column.name, column.endpoint, cell.record, start, self.now(), ok)
            )
            self.frontier.resolve(cell, result.text if ok else None, None if ok else str(result))
        self.settle()

    def batches(self, cells: list[Cell]) -> list[list[Cell]]:
        """Consecutive cells of one column, cut at the endpoint's max_batch_size (as sent)."""
        out: list[list[Cell]] = []
        for cell in cells:
            column = self.job.column(cell.column)
            assert isinstance(column, LLMColumn)
            limit = self.job.endpoint(column.endpoint).max_batch_size
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
        "gen_done_at_first_judge": sum(t <= first_judge for t in gen_ends) / len(gen_ends),
        "first_record_s": ends[0] if ends else None,
        "half_records_s": ends[len(ends) // 2] if ends else None,
        "record_end_s": [round(t, 3) for t in ends],
    }  # fmt: skip


class LaunchedServer:
    """`python -m pipeserve.launch_server` on a free port, optionally pinned with taskset; its
    process group's CPU time can be read, so that each mode's server work is measured."""

    def __init__(self, flags: str, cpus: str | None) -> None:
        from pipeserve.utils import free_port

        port = free_port()
        cmd = [sys.executable, "-m", "pipeserve.launch_server", "--port", str(port)]
        pin = ["taskset", "-c", cpus] if cpus else []
        self.proc = subprocess.Popen(
            [*pin, *cmd, *shlex.split(flags)], stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"server '{flags}' did not become ready (exit status {self.proc.poll()})")

    def cpu_s(self) -> float:
        """User + system seconds of every live process in the server's process group."""
        pids = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True)
        total = 0.0
        for pid in pids.stdout.split():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # utime, stime: fields 14, 15
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in (r for r in rows if r["run"] == 0):
        ends = row["record_end_s"]
        ax.step([0, *ends], range(len(ends) + 1), where="post", label=row["mode"])
    ax.set(xlabel="seconds since start", ylabel="records finished")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(rows: list[dict]) -> str:
    """One line per run, then the median of each mode. `column / wall` divides the column-by-
    column wall time of the same run (modes run back to back) by this mode's wall time; the
    median line gives the median of those ratios."""
    column = {r["run"]: r["wall_s"] for r in rows if r["mode"] == "column"}
    for r in rows:
        r["speedup_vs_column"] = column[r["run"]] / r["wall_s"] if r["run"] in column else None
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    medians = [median_row(m, [r for r in rows if r["mode"] == m]) for m in modes]
    lines = [
        "| mode | run | wall (s) | column / wall | gen done at 1st judge | 1st record (s) "
        "| half the records (s) | CPU (s) A / B / client | load avg | verified |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [*rows, *medians]:
        speed = f"{r['speedup_vs_column']:.2f}x" if r["speedup_vs_column"] else "-"
        cpu = [*(r.get("server_cpu_s") or {}).values(), r["client_cpu_s"]]
        cpu_text = " / ".join(f"{v:.1f}" for v in cpu)
        lines.append(
            f"| {r['mode']} | {r['run']} | {r['wall_s']:.1f} | {speed} "
            f"| {r['gen_done_at_first_judge']:.1%} | {r['first_record_s']:.2f} "
            f"| {r['half_records_s']:.1f} | {cpu_text} | {r.get('load', '-')} "
            f"| {r['verified']}/{r['records']} |"
        )
    return "\n".join(lines)


def client_cpu_s() -> float:
    """User + system seconds of this process (the client of every mode)."""
    return sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # ru_utime + ru_stime


def median_row(mode: str, runs: list[dict]) -> dict:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    keys = ("wall_s", "gen_done_at_first_judge", "first_record_s", "half_records_s", "client_cpu_s")
    row = {"mode": mode, "run": "median", **{k: med(k) for k in keys}}
    ratios = [r["speedup_vs_column"] for r in runs if r["speedup_vs_column"]]
    row["speedup_vs_column"] = statistics.median(ratios) if ratios else None
    row["server_cpu_s"] = {
        name: statistics.median(r["server_cpu_s"][name] for r in runs)
        for name in runs[0].get("server_cpu_s") or {}
    }
    row["verified"], row["records"] = runs[0]["verified"], runs[0]["records"]
    return row


def run_all(args: argparse.Namespace, job: Job, servers: dict[str, LaunchedServer]) -> list[dict]:
    records = make_records(args.records, seed=0)
    asyncio.run(run_mode("runner", job, records[:64]))  # warm-up
    rows = []
    for run in range(args.repeats):
        for mode in args.modes.split(","):
            cpu0 = {n: s.cpu_s() for n, s in servers.items()}
            client0, load0 = client_cpu_s(), os.getloadavg()[0]
            row = asyncio.run(run_mode(mode, job, records))
            row["run"] = run
            row["server_cpu_s"] = {n: s.cpu_s() - cpu0[n] for n, s in servers.items()}
            row["client_cpu_s"] = client_cpu_s() - client0
            row["load"] = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
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
    args = p.parse_args()
    with endpoints(args) as (urls, servers):
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
    launched = {"adder": args.url_a or f"{args.flags_a} cpus={args.cpus_a}"}
    launched["checker"] = args.url_b or f"{args.flags_b} cpus={args.cpus_b}"
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
