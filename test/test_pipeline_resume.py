"""Resuming keys a record by its content (a digest of the input record) or by its `id`: records
moved, added or changed between runs are each computed once, against their own fields."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from pipeserve.pipeline import Endpoint, Job, LLMColumn, run_job
from pipeserve.pipeline.endpoint.mock_server import MockConfig, MockThread


@pytest.fixture(scope="module")
def mock() -> Iterator[MockThread]:
    with MockThread(MockConfig()) as thread:
        yield thread


def echo_job(url: str) -> Job:
    return Job((Endpoint("e", url, max_concurrency=2),), (LLMColumn("echo", "e", "say {w}"),))


def last_lines(path) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return rows


def run(mock: MockThread, records: list[dict], path) -> list[str]:
    """Runs the job; the prompts this run sent, sorted (two go out at once: either may arrive first)."""
    before = len(mock.servers[0].bodies)
    run_job(echo_job(mock.url), records, str(path))
    return sorted(b["prompt"] for b in mock.servers[0].bodies[before:])


def test_a_record_prepended_without_ids_is_computed_and_no_record_twice(mock, tmp_path):
    out = tmp_path / "o.jsonl"
    assert run(mock, [{"w": "a"}, {"w": "b"}], out) == ["say a", "say b"]
    assert run(mock, [{"w": "new"}, {"w": "a"}, {"w": "b"}], out) == ["say new"]
    rows = last_lines(out)
    assert sorted((r["w"], r["echo"]) for r in rows) == [
        ("a", "<say a>"), ("b", "<say b>"), ("new", "<say new>")
    ]  # fmt: skip
    assert run(mock, [{"w": "b"}, {"w": "new"}, {"w": "a"}], out) == []  # reordered: all done


def test_identical_records_without_ids_are_each_computed_once(mock, tmp_path):
    out = tmp_path / "o.jsonl"
    assert run(mock, [{"w": "x"}, {"w": "x"}], out) == ["say x", "say x"]
    assert run(mock, [{"w": "x"}, {"w": "x"}, {"w": "x"}], out) == ["say x"]
    assert run(mock, [{"w": "x"}, {"w": "x"}, {"w": "x"}], out) == []


def test_a_record_whose_fields_changed_under_the_same_id_is_recomputed(mock, tmp_path):
    out = tmp_path / "o.jsonl"
    assert run(mock, [{"id": 1, "w": "old"}, {"id": 2, "w": "same"}], out) == [
        "say old", "say same"
    ]  # fmt: skip
    assert run(mock, [{"id": 1, "w": "new"}, {"id": 2, "w": "same"}], out) == ["say new"]
    last = {r["id"]: r for r in last_lines(out)}
    assert last[1]["echo"] == "<say new>" and last[1]["w"] == "new"
