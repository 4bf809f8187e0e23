"""Structured columns (a JSON schema; the cell is the parsed object, regenerated while it does
not parse or fit) and validator columns (a rejected cell is regenerated before anything reads
it), against an in-process mock endpoint whose answers change from one generation to the next."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import pytest

from pipeserve.pipeline import Endpoint, Job, JobError, LLMColumn, PythonColumn, run_job
from pipeserve.pipeline.endpoint.mock_server import MockConfig, MockThread

REVIEW = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "reason": {"type": "string", "minLength": 1},
    },
    "required": ["score", "reason"],
    "additionalProperties": False,
}


def in_turn(answers: dict[str, list[str]]) -> Callable[[str], str]:
    """Answers a prompt with the next of its scripted answers (the last one repeats); prompts
    not scripted are echoed."""
    asked: Counter[str] = Counter()

    def answer(prompt: str) -> str:
        for key, script in answers.items():
            if key in prompt:
                asked[key] += 1
                return script[min(asked[key], len(script)) - 1]
        return f"<{prompt}>"

    return answer


def run(answers: dict[str, list[str]], columns: tuple, records: list[dict], tmp_path, **kw):
    with MockThread(MockConfig(answer=in_turn(answers))) as mock:
        job = Job((Endpoint("e", mock.url, max_concurrency=2, **kw),), columns)
        summary = run_job(job, records, str(tmp_path / "o.jsonl"))
        bodies = mock.servers[0].bodies
    with open(tmp_path / "o.jsonl") as f:
        rows = {r["item"]: r for r in map(json.loads, f)}
    return summary, rows, bodies


def test_a_structured_cell_is_regenerated_until_it_fits_and_its_fields_are_readable(tmp_path):
    answers = {
        "rate good": ["sure!", '{"score": 9, "reason": "x"}', 'Here:\n```json\n{"score": 4, '
                      '"reason": "fine"}\n```'],
        "rate bad": ["no JSON here"],
    }  # fmt: skip
    columns = (
        LLMColumn("review", "e", "rate {item}", output_schema=REVIEW),
        LLMColumn("why", "e", "why {review.score}: {{ review.reason }}"),
        LLMColumn("echoed", "e", "{{ review.reason | upper }} {{ review }}", syntax="jinja"),
        PythonColumn("high", lambda row: row["review"]["score"] >= 4, ("review",)),
    )
    summary, rows, _ = run(answers, columns, [{"item": "good"}, {"item": "bad"}], tmp_path)
    good = rows["good"]
    assert good["review"] == {"score": 4, "reason": "fine"} and good["high"] is True
    assert good["why"] == "<why 4: { review.reason }>"  # format syntax: {{ is a literal {
    assert good["echoed"] == '<FINE {"score": 4, "reason": "fine"}>'
    assert good["_usage"]["review"]["generations"] == 3
    bad = rows["bad"]
    assert bad["_errors"]["review"].startswith("the answer is not JSON")
    assert bad["_errors"]["review"].endswith("(after 3 generations)")
    assert bad["_errors"]["high"] == "not run: input column 'review' failed"
    assert summary.columns["review"].regenerated == 4 and summary.columns["review"].failed == 1


def test_response_format_carries_the_schema_where_the_endpoint_takes_it(tmp_path):
    column = LLMColumn("review", "e", "rate {item}", api="chat", output_schema=REVIEW)
    answers = {"rate": ['{"score": 2, "reason": "meh"}']}
    _, rows, bodies = run(answers, (column,), [{"item": "x"}], tmp_path, response_format=True)
    assert bodies[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "review", "schema": REVIEW},
    }
    assert rows["x"]["review"] == {"score": 2, "reason": "meh"}


def odd_rejected(row: dict) -> bool | str:
    return int(row["num"]) % 2 == 0 or f"{row['num']} is odd"


def test_a_validator_regenerates_a_rejected_cell_before_any_column_reads_it(tmp_path):
    answers = {"number for a": ["3", "5", "8"], "number for b": ["1"]}
    columns = (
        LLMColumn("num", "e", "number for {item}"),
        PythonColumn("even", odd_rejected, validates="num"),
        LLMColumn("half", "e", "half of {num}"),
    )
    summary, rows, bodies = run(answers, columns, [{"item": "a"}, {"item": "b"}], tmp_path)
    assert rows["a"]["num"] == "8" and rows["a"]["even"] is True
    assert rows["a"]["half"] == "<half of 8>"
    assert [b["prompt"] for b in bodies if b["prompt"].startswith("half")] == ["half of 8"]
    assert rows["b"]["num"] == "1"  # the last generation is kept, for a look at what failed
    assert rows["b"]["_errors"] == {
        "even": "rejected 'num': 1 is odd (after 3 generations)",
        "half": "not run: input column 'even' failed",
    }
    assert summary.columns["num"].regenerated == 4 and summary.columns["num"].done == 2


def test_a_job_graph_waits_for_validators_and_refuses_two_on_one_column():
    columns = (
        LLMColumn("num", "e", "n"),
        PythonColumn("even", odd_rejected, validates="num"),
        LLMColumn("half", "e", "half of {num}"),
    )
    job = Job((Endpoint("e", "http://127.0.0.1:1"),), columns)
    assert job.graph.inputs["half"] == ("num", "even") and job.graph.inputs["even"] == ("num",)
    with pytest.raises(JobError, match="both validate 'num'"):
        Job(job.endpoints, (*columns, PythonColumn("again", odd_rejected, validates="num")))
    with pytest.raises(JobError, match="keyword 'oneOf' is not supported"):
        LLMColumn("x", "e", "p", output_schema={"oneOf": [{"type": "string"}]})


@pytest.mark.parametrize(
    "value, found",
    [
        ({"score": 3, "reason": "ok"}, []),
        ({"score": 3.0, "reason": "ok"}, []),
        ({"score": True, "reason": "ok"}, ["$.score: expected integer, got boolean"]),
        ({"score": 0, "reason": ""}, ["$.score: 0 is below minimum 1",
                                      "$.reason: 0 characters is below minLength 1"]),
        ({"score": 3}, ["$: missing 'reason'"]),
        ({"score": 3, "reason": "ok", "x": 1}, ["$: unexpected key 'x'"]),
        ([1], ["$: expected object, got array"]),
    ],
)  # fmt: skip
def test_schema_subset_reports_what_breaks_it(value, found):
    from pipeserve.pipeline.job.schema import problems

    assert problems(value, REVIEW) == found


def test_json_is_found_in_fenced_or_surrounded_answers():
    from pipeserve.pipeline.job.schema import parse_json

    assert parse_json(' {"a": 1} ') == {"a": 1}
    assert parse_json('Sure:\n```json\n{"a": [1, 2]}\n```\nDone.') == {"a": [1, 2]}
    assert parse_json('The answer is {"a": 2}, I think.') == {"a": 2}
    for bad in ("no json", '{"a": NaN}', "{broken"):
        with pytest.raises(ValueError):
            parse_json(bad)
