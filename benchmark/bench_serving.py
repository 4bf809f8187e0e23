"""Serving benchmark for any OpenAI-compatible server (/v1/completions, streaming or not).

Sweeps concurrency (or a request rate) over synthetic prompts of set lengths and reports request
and token throughput, TTFT and TPOT (p50/p90/p99); writes JSON and a PNG plot. The load comes from
`--client-procs` processes (serving_client.py), so that the client is not what is measured:
`--check-client` reruns every point with twice the processes, then with the first count again, and
says whether the doubled run moved from the mean of the other two.
Each point reports the CPU of every server process (from /proc: the launched server and all its
descendants, or `--server-pid`'s tree), the front end's CPU per output token and the clients' own
CPU. `--offline-engine` runs the same prompts through `Engine.generate` for a served/offline ratio.
It can start pipeserve itself, once per `--launch` argument string, for side-by-side runs:

    python benchmark/bench_serving.py --base-url http://127.0.0.1:30000 --server-pid 1234 \\
        --concurrency 1,8,32 --client-procs 4 --check-client
    python benchmark/bench_serving.py --launch "--pp-size 1" --launch "--pp-size 2" \\
        --concurrency 4,16,64 --client-procs 2 --offline-engine --json out.json --plot out.png
    python benchmark/bench_serving.py --plot-from out.json --plot out.png   # redraw, no run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx

import proc_cpu
from bench_plots import load, serving_figure
from serving_client import ClientOptions, Share, run_point, run_share, split, summarize

WORDS = (
    "the of and to in is was for on that with as by at from his her an be this which or are have"
)
CLIENT_CHECK_TOLERANCE = 0.05  # a point counts when 2x the client processes moves it less


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    server_pid: int | None  # root of the server's process tree, for its CPU
    engine_flags: list[str]  # launch flags, for the offline run of the same engine


def make_prompts(
    n: int, words: int, seed: int = 0, shared: tuple[int, int] | None = None
) -> list[str]:
    """n prompts of `words` random words; `shared` (G, P): in G groups, each group's prompts
    starting with the same P words (the groups interleaved, as concurrent users' would be)."""
    rng = random.Random(seed)
    vocab = WORDS.split()

    def text(k: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(k))

    if shared is None:
        return [text(words) for _ in range(n)]
    groups, prefix_words = shared
    prefixes = [text(prefix_words) for _ in range(groups)]
    return [prefixes[i % groups] + " " + text(words) for i in range(n)]


def cache_counters(url: str) -> tuple[float, float] | None:
    """(prompt tokens admitted from the prefix cache, prompt tokens admitted) from the server's
    /metrics; None when it exports neither."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name.removesuffix("_total")] = value
    try:
        hits = float(values["pipeserve_prefix_cache_hit_tokens"])
        return hits, float(values["pipeserve_prefix_cache_query_tokens"])
    except (KeyError, ValueError):
        return None


def server_cpu(usage: list[proc_cpu.ProcUsage], output_tokens: int) -> dict:
    """Per-process CPU of a point, and the front end's (every process but the ranks) per token."""
    frontend_s = sum(u.cpu_s for u in usage if not u.is_rank)
    return {
        "server_procs": [dataclasses.asdict(u) for u in usage],
        "server_cpu_pct": sum(u.cpu_pct for u in usage),
        "frontend_cpu_us_per_token": 1e6 * frontend_s / output_tokens if output_tokens else None,
    }


def measure(
    target: Target,
    prompts: list[str],
    point: tuple[int | None, float | None],
    procs: int,
    opts: ClientOptions,
) -> dict:
    """One point with `procs` client processes, and the server's CPU while it ran."""
    shares = split(prompts, *point, procs)
    before: dict[int, proc_cpu.ProcTime] = {}
    pid = target.server_pid

    def on_start() -> None:
        if pid is not None:
            before.update(proc_cpu.take(pid))

    counters = cache_counters(target.url)
    run = run_point(shares, opts, f"c={point[0]} rate={point[1]} procs={len(shares)}", on_start)
    row = {"client_procs": len(shares), **summarize(run)}
    after_counters = cache_counters(target.url)
    if counters and after_counters:
        hits, queried = (b - a for a, b in zip(counters, after_counters, strict=True))
        row["cache_hit_rate"] = hits / queried if queried else None
    if pid is not None:
        after = proc_cpu.take(pid)
        row.update(server_cpu(proc_cpu.usage(before, after, run.wall_s), row["output_tokens"]))
    return row


def client_check(row: dict, doubled: dict, again: dict) -> dict:
    """Doubled processes against the mean of the runs before and after it (N, 2N, N), so that a
    drift over the runs (warm caches, a busier host) does not read as the client's limit."""
    base = (row["output_tok_per_s"] + again["output_tok_per_s"]) / 2
    change = doubled["output_tok_per_s"] / base - 1
    return {
        "client_procs": doubled["client_procs"],
        "errors": doubled["errors"] + again["errors"],
        "output_tok_per_s": doubled["output_tok_per_s"],
        "repeat_output_tok_per_s": again["output_tok_per_s"],  # the N-process run again
        "change": change,
        "client_cpu_pct_max": doubled["client_cpu_pct_max"],
        "client_not_bottleneck": abs(change) < CLIENT_CHECK_TOLERANCE
        and not (doubled["errors"] or again["errors"]),
    }


def launch(extra: str, model_path: str | None) -> tuple[subprocess.Popen, str]:
    from pipeserve.utils import free_port

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "pipeserve.launch_server",
        "--port",
        str(port),
        *shlex.split(extra),
    ]
    if model_path:
        cmd += ["--model-path", model_path]
    # the log stays open (and on disk) for as long as the server runs
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-serving-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read()[-3000:]
            raise SystemExit(f"server {cmd} exited with {proc.returncode}; its log ends:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


def _server_cell(row: dict) -> str:
    procs = [p for p in row.get("server_procs", []) if p["cpu_s"] > 0]
    return ", ".join(f"{p['name']} {p['cpu_pct']:.0f}" for p in procs) or "-"


def _check_cell(row: dict) -> tuple[str, str]:
    check = row["client_check"]
    if check is None:
        return "-", "not checked"
    figures = (
        f"{check['output_tok_per_s']:.1f} ({check['change']:+.1%}, {check['client_procs']}p; "
        f"1x again {check['repeat_output_tok_per_s']:.1f})"
    )
    return figures, "yes" if check["client_not_bottleneck"] else "NO"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


TABLE_HEADER = (
    "target",
    "c",
    "rate",
    "procs",
    "req/s",
    "out tok/s",
    "TTFT p50/p90/p99 ms",
    "TPOT p50/p90/p99 ms",
    "server CPU % per process",
    "front end us/tok",
    "client CPU % (max)",
    "2x procs tok/s",
    "client not the bottleneck",
    "offline tok/s",
    "served/offline",
    "cache hit",
)


def table_cells(row: dict) -> list[str]:
    figures, verdict = _check_cell(row)
    return [
        row["target"],
        str(row["concurrency"]),
        str(row["request_rate"]),
        str(row["client_procs"]),
        f"{row['req_per_s']:.2f}",
        f"{row['output_tok_per_s']:.1f}",
        "/".join(f"{row[f'ttft_ms_p{q}']:.0f}" for q in (50, 90, 99)),
        "/".join(f"{row[f'tpot_ms_p{q}']:.1f}" for q in (50, 90, 99)),
        _server_cell(row),
        _fmt(row.get("frontend_cpu_us_per_token"), ".0f"),
        f"{row['client_cpu_pct_max']:.0f}",
        figures,
        verdict,
        _fmt(row.get("offline_output_tok_per_s"), ".1f"),
        _fmt(row.get("served_over_offline"), ".2f"),
        _fmt(row.get("cache_hit_rate"), ".3f"),
    ]


def print_point(row: dict) -> None:
    cells = dict(zip(TABLE_HEADER, table_cells(row), strict=True))
    print("  ".join(f"{k}={v}" for k, v in cells.items() if k != "offline tok/s"), flush=True)
    if row["errors"]:
        print(
            f"WARNING: {row['errors']} requests failed; the first: {row['first_error']}", flush=True
        )


def print_table(rows: list[dict]) -> None:
    """A Markdown table; a point counts only where doubling the client processes left it within 5%."""
    print("| " + " | ".join(TABLE_HEADER) + " |")
    print("|" + "---|" * len(TABLE_HEADER))
    for row in rows:
        print("| " + " | ".join(table_cells(row)) + " |")


def sweep_points(args: argparse.Namespace) -> list[tuple[int | None, float | None]]:
    if args.request_rate is None:
        return [(c, None) for c in args.concurrency]
    return [(None, r) for r in args.request_rate]


def run_target(target: Target, args: argparse.Namespace) -> list[dict]:
    opts = ClientOptions(
        target.url, args.model, args.output_len, args.ignore_eos, args.stream, args.timeout
    )
    seeds = iter(range(2, 1 << 30))  # every run sends prompts of its own: none is cached

    def prompts_for(c: int | None, seed: int) -> list[str]:
        prompts = make_prompts(args.num_prompts, args.input_len, seed, args.shared_prefix)
        if c is not None and args.per_client:  # short runs at low concurrency
            prompts = prompts[: max(1, min(len(prompts), args.per_client * c))]
        return prompts

    def warm_up(c: int | None) -> None:
        """One wave at the point's concurrency (prompts measured nowhere), so that what the
        server compiles or allocates on first use at that batch size is not in the first run."""
        n = min(c or 8, args.num_prompts)
        asyncio.run(run_share(Share(make_prompts(n, args.input_len, seed=1), n, None), opts, None))

    rows = []
    for c, r in sweep_points(args):
        row = {"target": target.label, "concurrency": c, "request_rate": r, "stream": args.stream}
        warm_up(c)
        row.update(measure(target, prompts_for(c, next(seeds)), (c, r), args.client_procs, opts))
        row["client_check"] = None
        if args.check_client:
            point = (c, r)
            doubled = measure(
                target, prompts_for(c, next(seeds)), point, 2 * args.client_procs, opts
            )
            again = measure(target, prompts_for(c, next(seeds)), point, args.client_procs, opts)
            row["client_check"] = client_check(row, doubled, again)
        print_point(row)
        rows.append(row)
    return rows


def engine_kwargs(flags: list[str]) -> dict:
    """The Engine's keyword arguments for server flags, read by the server's own parser."""
    from pipeserve.config import EngineConfig
    from pipeserve.server.args import build_parser

    ns, _ = build_parser().parse_known_args(flags)
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    return {n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None}


def offline_tok_per_s(flags: list[str], args: argparse.Namespace) -> list[float]:
    """Output tokens/s of `Engine.generate` on prompts of the benchmark's shape, all submitted at
    once, in each of --offline-repeats runs on one engine, each with prompts of its own (as every
    served run: none is in the prefix cache); start-up and an 8-prompt warm-up are not timed."""
    from pipeserve import Engine

    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": args.ignore_eos}
    runs = []
    with Engine(**engine_kwargs(flags)) as engine:
        engine.generate(make_prompts(8, args.input_len, seed=1), params)
        for k in range(args.offline_repeats):
            seed = (1 << 30) + k  # past the served runs' seeds
            prompts = make_prompts(args.num_prompts, args.input_len, seed, args.shared_prefix)
            start = time.perf_counter()
            out = engine.generate(prompts, params)
            wall = time.perf_counter() - start
            runs.append(sum(o["meta_info"]["completion_tokens"] for o in out) / wall)
    return runs


def add_offline(rows: list[dict], flags: list[str], args: argparse.Namespace) -> None:
    """The offline figure of a row is the median of its runs (one run of a few seconds moved by
    a quarter between two points of one device call)."""
    runs = offline_tok_per_s(flags, args)
    tok_s = statistics.median(runs)
    listed = ", ".join(f"{r:.1f}" for r in runs)
    print(f"offline Engine {shlex.join(flags)}: {tok_s:.1f} tok/s (median of {listed})", flush=True)
    for row in rows:
        row["offline_output_tok_per_s"] = tok_s
        row["offline_runs_tok_per_s"] = runs
        row["served_over_offline"] = row["output_tok_per_s"] / tok_s


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every target in turn; the offline run of a launched engine after its server has stopped."""
    rows: list[dict] = []
    model_flags = ["--model-path", args.model_path] if args.model_path else []
    if args.base_url:
        url = args.base_url.rstrip("/")
        rows += run_target(Target(args.base_url, url, args.server_pid, model_flags), args)
        if args.offline_engine:
            add_offline(rows, model_flags, args)
    for extra in args.launch:
        proc, url = launch(extra, args.model_path)
        flags = [*shlex.split(extra), *model_flags]
        try:
            mine = run_target(Target(f"pipeserve {extra}", url, proc.pid, flags), args)
        finally:
            proc.terminate()
            proc.wait(60)
        if args.offline_engine:
            add_offline(mine, flags, args)
        rows += mine
    return rows


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--base-url", default=None, help="a running server (default: use --launch)")
    add("--server-pid", type=int, default=None, help="with --base-url: its PID, for its CPU")
    add("--model", default=None, help="model name to send (default: none)")
    add(
        "--launch",
        action="append",
        default=[],
        help="start pipeserve with these flags (repeatable)",
    )
    add("--model-path", default=None, help="for --launch and --offline-engine: the model directory")
    add("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    add(
        "--request-rate",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="requests/s (Poisson), instead of concurrency",
    )
    add("--num-prompts", type=int, default=200)
    add(
        "--per-client",
        type=int,
        default=None,
        help="with --concurrency: send min(num-prompts, this x concurrency) requests per point",
    )
    add("--input-len", type=int, default=32, help="words per prompt (after a shared prefix)")
    add(
        "--shared-prefix",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=None,
        metavar="G,P",
        help="G groups of prompts, each group's starting with the same P words",
    )
    add("--output-len", type=int, default=64)
    add("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    add("--stream", action=argparse.BooleanOptionalAction, default=True, help="or --no-stream")
    add("--client-procs", type=int, default=1, help="client processes, one event loop each")
    add(
        "--check-client",
        action="store_true",
        help="rerun each point with 2x --client-procs, then 1x again",
    )
    add("--offline-engine", action="store_true", help="also run the prompts through Engine")
    add(
        "--offline-repeats",
        type=positive_int,
        default=3,
        help="offline runs, each with fresh prompts; their median is the figure",
    )
    add("--timeout", type=float, default=600)
    add("--json", default=None)
    add("--plot", default=None, help="PNG: tokens/s, TTFT and TPOT against the sweep")
    add("--plot-from", default=None, metavar="JSON", help="redraw --plot from saved rows, no run")
    add("--plot-title", default=None, help="a title over the plot (the machine, the model)")
    args = parser.parse_args()
    if args.plot_from and not args.plot:
        parser.error("--plot-from needs --plot")
    if not args.base_url and not args.launch and not args.plot_from:
        parser.error("give --base-url or at least one --launch")
    return args


def main() -> None:
    args = parse_args()
    if args.plot_from:
        serving_figure(load(args.plot_from), args.plot, args.plot_title)
        return
    rows = run_all(args)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        serving_figure(rows, args.plot, args.plot_title)
    failed = sum(row["errors"] for row in rows)
    if failed:  # a point's figures count only its answered requests: say so, and exit non-zero
        sys.exit(f"error: {failed} requests failed (see each point's 'errors' in the JSON)")


if __name__ == "__main__":
    main()
