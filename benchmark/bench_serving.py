"""Serving benchmark for any OpenAI-compatible server (streaming /v1/completions).

Sweeps concurrency (or a request rate) over synthetic prompts of set lengths and reports request
and token throughput, TTFT and TPOT (p50/p90/p99), with a progress bar; writes JSON and a PNG plot.
It can also start pipeserve itself, once per `--launch` argument string, for side-by-side runs:

    python benchmark/bench_serving.py --base-url http://127.0.0.1:30000 --concurrency 1,8,32
    python benchmark/bench_serving.py --launch "--pp-size 1" --launch "--pp-size 2 --pp-comm-mode sync" \\
        --launch "--pp-size 2" --concurrency 4,16,64 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
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
from tqdm import tqdm

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "be",
    "this",
    "which",
    "or",
    "are",
    "have",
]


@dataclass
class Sample:
    ttft: float
    latency: float
    output_tokens: int

    @property
    def tpot(self) -> float | None:
        return (
            (self.latency - self.ttft) / (self.output_tokens - 1)
            if self.output_tokens > 1
            else None
        )


def make_prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def one_request(
    http: httpx.AsyncClient, url: str, model: str | None, prompt: str, args: argparse.Namespace
) -> Sample:
    body = {
        "prompt": prompt,
        "max_tokens": args.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    if args.ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    ttft, tokens, chunks = None, None, 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data.get("choices") and data["choices"][0].get("text"):
                chunks += 1
                ttft = ttft or time.perf_counter() - start
    latency = time.perf_counter() - start
    return Sample(ttft or latency, latency, tokens if tokens is not None else chunks)


async def sweep_point(
    url: str,
    model: str | None,
    prompts: list[str],
    concurrency: int | None,
    rate: float | None,
    args: argparse.Namespace,
) -> dict:
    limit = asyncio.Semaphore(concurrency or len(prompts))
    bar = tqdm(total=len(prompts), desc=f"c={concurrency} rate={rate}", leave=False)
    rng = random.Random(1)

    async def guarded(http: httpx.AsyncClient, p: str) -> Sample:
        async with limit:
            s = await one_request(http, url, model, p, args)
            bar.update()
            return s

    async with httpx.AsyncClient(
        timeout=args.timeout, limits=httpx.Limits(max_connections=None)
    ) as http:
        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(guarded(http, p)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        samples = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    bar.close()
    return summarize(samples, wall, concurrency, rate)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def summarize(
    samples: list[Sample], wall: float, concurrency: int | None, rate: float | None
) -> dict:
    ttft = [s.ttft * 1e3 for s in samples]
    tpot = [s.tpot * 1e3 for s in samples if s.tpot is not None]
    out_tokens = sum(s.output_tokens for s in samples)
    row = {
        "concurrency": concurrency,
        "request_rate": rate,
        "requests": len(samples),
        "wall_s": wall,
        "req_per_s": len(samples) / wall,
        "output_tok_per_s": out_tokens / wall,
    }
    for name, vals in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        row.update(
            {
                f"{name}_p50": statistics.median(vals) if vals else float("nan"),
                f"{name}_p90": pct(vals, 0.9),
                f"{name}_p99": pct(vals, 0.99),
            }
        )
    return row


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


def run_target(label: str, url: str, model: str | None, args: argparse.Namespace) -> list[dict]:
    prompts = make_prompts(args.num_prompts, args.input_len)
    asyncio.run(sweep_point(url, model, prompts[: min(8, len(prompts))], 8, None, args))  # warm-up
    rows = []
    points = (
        [(c, None) for c in args.concurrency]
        if args.request_rate is None
        else [(None, r) for r in args.request_rate]
    )
    for c, r in points:
        some = prompts
        if c is not None and args.per_client:  # short runs at low concurrency
            some = prompts[: max(1, min(len(prompts), args.per_client * c))]
        row = {"target": label, **asyncio.run(sweep_point(url, model, some, c, r, args))}
        rows.append(row)
        print(
            f"{label:>32} c={c!s:>4} rate={r!s:>5}  {row['req_per_s']:7.2f} req/s {row['output_tok_per_s']:9.1f} tok/s  "
            f"TTFT p50/p90/p99 {row['ttft_ms_p50']:.0f}/{row['ttft_ms_p90']:.0f}/{row['ttft_ms_p99']:.0f} ms  "
            f"TPOT p50/p90/p99 {row['tpot_ms_p50']:.1f}/{row['tpot_ms_p90']:.1f}/{row['tpot_ms_p99']:.1f} ms",
            flush=True,
        )
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    key = "concurrency" if rows[0]["concurrency"] is not None else "request_rate"
    for label in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == label]
        xs = [r[key] for r in mine]
        axes[0].plot(xs, [r["output_tok_per_s"] for r in mine], marker="o", label=label)
        axes[1].plot(xs, [r["ttft_ms_p50"] for r in mine], marker="o", label=label)
        axes[2].plot(xs, [r["tpot_ms_p50"] for r in mine], marker="o", label=label)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)"), strict=True):
        ax.set_xlabel(key)
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default=None, help="a running server (default: use --launch)")
    parser.add_argument("--model", default=None, help="model name to send (default: none)")
    parser.add_argument(
        "--launch",
        action="append",
        default=[],
        help="start pipeserve with these flags (repeatable)",
    )
    parser.add_argument("--model-path", default=None, help="for --launch: the model directory")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64]
    )
    parser.add_argument(
        "--request-rate",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="requests/s (Poisson), instead of concurrency",
    )
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument(
        "--per-client",
        type=int,
        default=None,
        help="with --concurrency: send min(num-prompts, this x concurrency) requests per point",
    )
    parser.add_argument("--input-len", type=int, default=32, help="words per prompt")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="PNG path")
    args = parser.parse_args()
    rows = []
    if args.base_url:
        rows += run_target(args.base_url, args.base_url.rstrip("/"), args.model, args)
    for extra in args.launch:
        proc, url = launch(extra, args.model_path)
        try:
            rows += run_target(f"pipeserve {extra}", url, args.model, args)
        finally:
            proc.terminate()
            proc.wait(60)
    if not rows:
        parser.error("give --base-url or at least one --launch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
