"""The command line against an in-process mock endpoint: Ctrl-C ends a run with a summary and a
resume hint, `--limit` and `--preview` run the first records only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml

from pipeserve.pipeline.endpoint.mock_server import MockConfig, MockThread


@pytest.fixture(scope="module")
def mock() -> Iterator[MockThread]:
    with MockThread(MockConfig(latency_s=0.02, concurrency=2)) as thread:
        yield thread


def files(tmp_path, url: str, n: int) -> tuple[str, str]:
    job = {
        "endpoints": {"e": {"base_url": url, "max_concurrency": 2}},
        "columns": {
            "echo": {"endpoint": "e", "prompt": "say {w}"},
            "shout": {"endpoint": "e", "prompt": "shout {echo}"},
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"w": f"w{i}"}) + "\n" for i in range(n)))
    return str(tmp_path / "job.yaml"), str(tmp_path / "in.jsonl")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeserve.pipeline", "run", *args, "--no-progress"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def test_ctrl_c_prints_a_summary_and_a_resume_hint_then_a_rerun_finishes(mock, tmp_path):
    job, records = files(tmp_path, mock.url, 120)
    out = str(tmp_path / "o.jsonl")
    proc = subprocess.Popen(
        cli(job, "--input", records, "--output", out),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while len(lines(out)) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "stopped: interrupted" in stdout and "run the same command again to resume" in stdout
    written = len(lines(out))
    assert 5 <= written < 120 and f"{written} records written" in stdout
    rerun = subprocess.run(
        cli(job, "--input", records, "--output", out), capture_output=True, text=True, env=env()
    )
    assert rerun.returncode == 0, rerun.stderr
    rows = lines(out)
    assert len(rows) == 120 and len({r["w"] for r in rows}) == 120
    assert all(r["shout"] == f"<shout <say {r['w']}>>" for r in rows)


def test_limit_runs_the_first_records_only(mock, tmp_path):
    job, records = files(tmp_path, mock.url, 20)
    out = str(tmp_path / "o.jsonl")
    run = subprocess.run(
        cli(job, "--input", records, "--output", out, "--limit", "4"),
        capture_output=True, text=True, env=env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(r["w"] for r in lines(out)) == ["w0", "w1", "w2", "w3"]


def test_preview_prints_the_first_records_as_a_table_and_writes_no_output(mock, tmp_path):
    job, records = files(tmp_path, mock.url, 20)
    run = subprocess.run(
        cli(job, "--input", records, "--preview", "3"), capture_output=True, text=True, env=env()
    )
    assert run.returncode == 0, run.stderr
    table = run.stdout.splitlines()
    assert table[0].split() == ["w", "echo", "shout"]
    assert table[1].split() == ["w0", "<say", "w0>", "<shout", "<say", "w0>>"]
    assert table[3].split()[0] == "w2" and "3 records written" in run.stdout
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "job.yaml"]
