"""`benchmark/bench_pipeline.py --mock` runs in CI: against in-process mock endpoints the runner
beats column by column, starts the judge early, and the snapshot dispatcher does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mock_benchmark_shows_the_runner_overlapping_the_columns(tmp_path):
    out = tmp_path / "mock.json"
    cmd = [
        sys.executable, os.path.join(ROOT, "benchmark", "bench_pipeline.py"), "--mock",
        "--records", "400", "--mock-latency", "0.05", "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["verified"] == 400 and r["failed_requests"] == 0 for r in rows.values())
    assert rows["runner"]["speedup_vs_column"] > 1.3  # 2x ideal; loose for a busy machine
    assert rows["runner"]["gen_done_at_first_judge"] < 0.1
    assert rows["snapshot"]["gen_done_at_first_judge"] > 0.7  # all but its last waves
