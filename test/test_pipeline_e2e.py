"""The example job (examples/pipeline) end to end through two real servers on 127.0.0.1 with the
embedded model, one of them at --pp-size 2; a server killed mid-run and a killed runner lose no
record: the re-run completes the rest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml

from pipeserve.pipeline.io import read_output
from server_harness import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "pipeline")
sys.path.insert(0, EXAMPLE)
from make_records import make_records  # noqa: E402

B_FLAGS = ("--pp-size", "2")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    """Server A (generator, pp 1) and server B (judge, pp 2), started side by side."""
    started = {"a": Server("--cpu-threads", "1", ready=False), "b": Server(*B_FLAGS, ready=False)}
    try:
        for server in started.values():
            server.wait_ready(240)
        yield started
    finally:
        for server in started.values():
            server.stop()


def command(servers: dict[str, Server], job: str, records: str, output: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeserve.pipeline", "run", job,
        "--input", records, "--output", output, "--no-progress",
        "--endpoint", f"adder={servers['a'].url}/v1",
        "--endpoint", f"checker={servers['b'].url}/v1",
        "--summary-json", output + ".summary.json",
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def write_records(path: str, n: int, seed: int) -> list[dict]:
    records = make_records(n, seed)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def small_job(tmp_path, concurrency: int) -> str:
    """The example job with fewer slots and quick retries, so that a dead server fails fast."""
    with open(os.path.join(EXAMPLE, "job.yaml")) as f:
        spec = yaml.safe_load(f)
    for endpoint in spec["endpoints"].values():
        endpoint.update(max_concurrency=concurrency, max_batch_size=1)
    spec["retry"] = {"max_attempts": 2, "backoff_s": 0.05, "max_backoff_s": 0.1}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    shutil.copy(os.path.join(EXAMPLE, "checks.py"), tmp_path / "checks.py")
    return str(path)


def last_lines(path: str) -> dict[int, dict]:
    """Each record's last line, by id (a line torn by a killed run is skipped)."""
    return {key[1]: row for key, row in read_output(path).items()}


def assert_all_correct(rows: dict[int, dict], records: list[dict]) -> None:
    assert sorted(rows) == [r["id"] for r in records]
    for r in records:
        row = rows[r["id"]]
        assert "_errors" not in row, row
        assert row["sum"] == str(r["a"] + r["b"]), row
        assert row["verified"] == (row["check"] == str(r["a"])), row
    assert sum(row["verified"] for row in rows.values()) >= 0.9 * len(records)


def summary(output: str) -> dict:
    with open(output + ".summary.json") as f:
        return json.load(f)


def test_example_job_through_two_servers(servers, tmp_path):
    records = write_records(str(tmp_path / "in.jsonl"), 24, seed=0)
    out = str(tmp_path / "out.jsonl")
    job = os.path.join(EXAMPLE, "job.yaml")
    run = subprocess.run(
        command(servers, job, str(tmp_path / "in.jsonl"), out),
        capture_output=True, text=True, env=env(), timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert_all_correct(last_lines(out), records)
    s = summary(out)
    assert s["columns"]["sum"]["done"] == 24 and s["columns"]["check"]["done"] == 24
    assert s["columns"]["check"]["completion_tokens"] > 0 and "24 records written" in run.stdout
    # A second run finds every record done and sends nothing.
    again = subprocess.run(
        command(servers, job, str(tmp_path / "in.jsonl"), out),
        capture_output=True, text=True, env=env(), timeout=60,
    )  # fmt: skip
    assert again.returncode == 0 and summary(out)["records_skipped"] == 24
    with open(out) as f:
        assert len(f.readlines()) == 24


def wait_for_lines(path: str, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= n:
                    return
        assert proc.poll() is None, "the run ended before the kill"
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout} s")


def test_killed_server_then_restarted_loses_no_record(servers, tmp_path):
    records = write_records(str(tmp_path / "in.jsonl"), 150, seed=1)
    out = str(tmp_path / "out.jsonl")
    cmd = command(servers, small_job(tmp_path, 2), str(tmp_path / "in.jsonl"), out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    wait_for_lines(out, 10, proc)
    port = servers["b"].port
    os.killpg(servers["b"].proc.pid, signal.SIGKILL)  # the judge server and its ranks die
    servers["b"].proc.wait(30)
    # The judge's cells fail fast once its server is down, and the run stops on its error rate.
    assert proc.wait(120) == 1
    first = summary(out)
    failed, written = first["columns"]["check"]["failed"], first["records_written"]
    assert failed > 0 and 10 <= written <= 150
    servers["b"] = Server(*B_FLAGS, port=port, timeout=240)
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    second = summary(out)
    assert second["columns"]["sum"]["done"] == 150 - written  # written records kept their sum
    assert second["columns"]["check"]["done"] == failed + 150 - written
    assert second["records_skipped"] == written - failed
    assert_all_correct(last_lines(out), records)


def test_killed_runner_resumes_where_it_stopped(servers, tmp_path):
    records = write_records(str(tmp_path / "in.jsonl"), 150, seed=2)
    out = str(tmp_path / "out.jsonl")
    cmd = command(servers, small_job(tmp_path, 2), str(tmp_path / "in.jsonl"), out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    wait_for_lines(out, 10, proc)
    proc.kill()
    proc.wait(30)
    with open(out) as f:
        written = len({json.loads(line)["id"] for line in f if line.endswith("\n")})
    assert written < 150
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert summary(out)["records_skipped"] == written
    assert_all_correct(last_lines(out), records)
