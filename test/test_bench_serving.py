"""benchmark/bench_serving.py end to end: it launches the embedded model's server, loads it from two
client processes and reports tokens from the server's usage, per-process server CPU and a verdict
on the client. Runs the script itself, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmark"
sys.path.insert(0, str(BENCH))

from serving_client import split  # noqa: E402

NUM_PROMPTS, OUTPUT_LEN = 16, 8


def test_split_covers_every_prompt_once_and_the_whole_concurrency():
    prompts = [str(i) for i in range(10)]
    shares = split(prompts, 5, None, 2)
    assert [s.concurrency for s in shares] == [3, 2]
    assert [p for s in shares for p in s.prompts] == prompts
    assert len(split(prompts, 1, None, 4)) == 1  # never a process without a concurrent request


def run_bench(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(BENCH / "bench_serving.py"),
        "--launch",
        "--pp-size 1 --device cpu --cpu-threads 1",
        "--num-prompts",
        str(NUM_PROMPTS),
        "--concurrency",
        "4",
        "--client-procs",
        "2",
        "--output-len",
        str(OUTPUT_LEN),
        "--json",
        str(out),
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=100, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "client not the bottleneck" in done.stdout  # the table's verdict column
    return json.loads(out.read_text())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_bench_serving_counts_usage_tokens_and_server_cpu(tmp_path, stream):
    (row,) = run_bench(tmp_path, stream, "--check-client")
    assert row["errors"] == 0 and row["missing_usage"] == 0
    assert row["requests"] == NUM_PROMPTS
    assert row["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN  # ignore_eos: every request runs out
    assert row["client_procs"] == 2 and len(row["client_cpu_s"]) == 2
    names = {p["name"]: p["cpu_s"] for p in row["server_procs"]}
    assert names["pipeserve-rank0"] > 0
    assert names["pipeserve.launch_server"] > 0
    assert row["frontend_cpu_us_per_token"] > 0
    assert isinstance(row["client_check"]["client_not_bottleneck"], bool)
    assert row["client_check"]["client_procs"] == 4
    assert row["client_check"]["repeat_output_tok_per_s"] > 0  # N, 2N, then N again
    if stream == "--stream":
        assert row["ttft_ms_p50"] > 0 and row["tpot_ms_p50"] > 0
