"""What a record's line holds: values as JSON (never Python's repr, never NaN), truncated
generations as errors with their finish_reason, token usage per record."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from pipeserve.pipeline import Endpoint, Job, LLMColumn, PythonColumn, run_job
from pipeserve.pipeline.endpoint.mock_server import MockConfig, MockThread


def cut_long(prompt: str) -> str | tuple[str, str]:
    """Prompts asking for something long stop at max_tokens."""
    return ("a b c", "length") if "long" in prompt else f"<{prompt}>"


@pytest.fixture(scope="module")
def mock() -> Iterator[MockThread]:
    with MockThread(MockConfig(answer=cut_long)) as thread:
        yield thread


def strict_rows(path) -> list[dict]:
    """The output's lines, parsed as strict JSON (NaN and Infinity are not JSON)."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} in the output")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def echo(url: str, *columns) -> Job:
    endpoint = Endpoint("e", url, max_concurrency=2, max_batch_size=2)
    return Job((endpoint,), (LLMColumn("echo", "e", "say {w}"), *columns))


def test_a_truncated_generation_is_a_cell_error_naming_its_finish_reason(mock, tmp_path):
    out = tmp_path / "o.jsonl"
    summary = run_job(echo(mock.url), [{"w": "short"}, {"w": "long"}], str(out))
    by_word = {r["w"]: r for r in strict_rows(out)}
    assert by_word["short"]["echo"] == "<say short>" and "_errors" not in by_word["short"]
    assert by_word["long"]["echo"] is None
    assert "finish_reason 'length'" in by_word["long"]["_errors"]["echo"]
    assert by_word["long"]["_usage"]["echo"]["finish_reason"] == "length"
    assert summary.cells_failed == 1


def test_allow_truncated_keeps_the_text_and_records_why_it_ended(mock, tmp_path):
    endpoint = Endpoint("e", mock.url)
    column = LLMColumn("echo", "e", "say {w}", allow_truncated=True)
    run_job(Job((endpoint,), (column,)), [{"w": "long"}], str(tmp_path / "o.jsonl"))
    (row,) = strict_rows(tmp_path / "o.jsonl")
    assert row["echo"] == "a b c" and row["_usage"]["echo"]["finish_reason"] == "length"


def test_nan_and_infinity_are_written_as_null(mock, tmp_path):
    stats = PythonColumn("stats", lambda row: {"mean": float("nan"), "top": [float("inf"), 1.5]})
    nan = PythonColumn("nan", lambda row: float("nan"))
    run_job(echo(mock.url, stats, nan), [{"w": "x"}], str(tmp_path / "o.jsonl"))
    (row,) = strict_rows(tmp_path / "o.jsonl")
    assert row["stats"] == {"mean": None, "top": [None, 1.5]} and row["nan"] is None


def test_dict_and_list_values_reach_prompts_as_json(mock, tmp_path):
    record = {"w": {"name": "Ada", "tags": ["x", "y"], "ok": True}}
    run_job(echo(mock.url), [record], str(tmp_path / "o.jsonl"))
    assert mock.servers[0].bodies[-1]["prompt"] == (
        'say {"name": "Ada", "tags": ["x", "y"], "ok": true}'
    )


def test_each_record_carries_its_token_usage(mock, tmp_path):
    records = [{"w": "one"}, {"w": "two three"}]
    summary = run_job(echo(mock.url), records, str(tmp_path / "o.jsonl"))
    usage = {r["w"]: r["_usage"]["echo"] for r in strict_rows(tmp_path / "o.jsonl")}
    assert sum(u["prompt_tokens"] for u in usage.values()) == summary.columns["echo"].prompt_tokens
    assert usage["two three"]["prompt_tokens"] > usage["one"]["prompt_tokens"]
    assert all(u["completion_tokens"] > 0 for u in usage.values())
