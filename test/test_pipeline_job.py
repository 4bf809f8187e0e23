"""Job files and records that cannot run are clear errors naming the problem; output files are
appended, resumed and compacted without losing a line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipeserve.pipeline import Endpoint, Job, JobError, LLMColumn, PythonColumn, load_job
from pipeserve.pipeline.io import OutputWriter, check_records, compact_output, read_output
from pipeserve.pipeline.job.template import TemplateError, render, template_fields

GOOD = """
endpoints:
  gen: {base_url: "http://127.0.0.1:1/v1", max_concurrency: 4}
  judge: {base_url: "http://127.0.0.1:2/v1", model: m}
columns:
  sum: {endpoint: gen, prompt: "{a}+{b}=", params: {max_tokens: 8}}
  check: {endpoint: judge, prompt: "{sum}-{b}=", api: chat}
  verified: {python: "checks_mod:verified", inputs: [check]}
retry: {max_attempts: 2, backoff_s: 0}
"""
CHECKS = "def verified(row):\n    return int(row['check']) == row['a']\n"


def write_job(tmp_path, text: str) -> str:
    (tmp_path / "checks_mod.py").write_text(CHECKS)
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_error(tmp_path, text: str) -> str:
    with pytest.raises(JobError) as e:
        load_job(write_job(tmp_path, text))
    return str(e.value)


def test_good_job_file_loads_into_the_python_api_objects(tmp_path):
    job = load_job(write_job(tmp_path, GOOD))
    assert job.endpoints[0] == Endpoint("gen", "http://127.0.0.1:1/v1", max_concurrency=4)
    assert job.columns[1] == LLMColumn("check", "judge", "{sum}-{b}=", api="chat")
    verified = job.column("verified")
    assert isinstance(verified, PythonColumn) and verified.inputs == ("check",)
    assert verified.function({"check": "3", "a": 3}) is True
    assert job.retry.max_attempts == 2 and job.graph.order == ("sum", "check", "verified")


@pytest.mark.parametrize(
    "change, message",
    [
        (("check: {endpoint: judge, prompt: \"{sum}-{b}=\", api: chat}",
          "check: {endpoint: judge, prompt: \"{verified}-{b}=\"}"),
         "the columns form a cycle: check -> verified -> check"),
        (("prompt: \"{a}+{b}=\"", "prompt: \"{sum}+{b}=\""),
         "the columns form a cycle: sum -> sum"),
        (("inputs: [check]", "inputs: [chek]"),
         "column 'verified' lists input 'chek', which is not a column (columns: sum, check, verified)"),
        (("endpoint: judge", "endpoint: jugde"),
         "column 'check' uses endpoint 'jugde', which is not defined (endpoints: gen, judge)"),
        (("retry:", "fields: [a, b]\nretry:"), None),
        (("retry:", "fields: [a]\nretry:"),
         "column 'sum': its prompt uses {b}, which is neither a column (sum, check, verified) nor a declared field (a)"),
        (("columns:", "colums:"), "the job: unknown key 'colums'"),
        (("max_concurrency: 4", "max_concurrency: four"),
         "endpoints.gen.max_concurrency: expected int, got str 'four'"),
        (("api: chat", "api: chatt"), "column 'check': api must be one of ('completions', 'chat')"),
        (("params: {max_tokens: 8}", "params: {prompt: x}"),
         "column 'sum': params may not set prompt (the runner does)"),
        (("checks_mod:verified", "checks_mod:nope"),
         "columns.verified.python: module 'checks_mod' has no function 'nope'"),
        (("checks_mod:verified", "no_such_module:f"),
         "columns.verified.python: cannot import module 'no_such_module'"),
        (("\"{a}+{b}=\"", "\"{a[0]}+{b}=\""), "only names and key paths such as {a} or {a.b}"),
        (("\"{a}+{b}=\"", "\"{a.__class__}+{b}=\""), "no positions, indexes or names starting"),
        (("gen: {", "gen: ["), "not valid YAML"),
        (("  sum:", "  sum:\n    prompt: x\n  sum:"), "duplicate key 'sum'"),
    ],
)  # fmt: skip
def test_malformed_job_files_name_the_problem(tmp_path, change, message):
    old, new = change
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    if message is None:
        load_job(write_job(tmp_path, text))
        return
    assert message in load_error(tmp_path, text)


def test_cli_reports_a_malformed_job_on_stderr_with_exit_status_2(tmp_path):
    path = write_job(tmp_path, GOOD.replace("inputs: [check]", "inputs: [chek]"))
    records = tmp_path / "in.jsonl"
    records.write_text('{"a": 1, "b": 2}\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "pipeserve.pipeline", "run", path, "--input", str(records)]
    out = subprocess.run(
        [*cmd, "--output", str(tmp_path / "o")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2
    assert "error:" in out.stderr and "lists input 'chek', which is not a column" in out.stderr
    assert not (tmp_path / "o").exists()


def test_cli_reports_a_missing_input_file(tmp_path):
    path = write_job(tmp_path, GOOD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "pipeserve.pipeline", "run", path, "--input", "/nonexistent.jsonl"]
    out = subprocess.run(
        [*cmd, "--output", str(tmp_path / "o")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "error: /nonexistent.jsonl: No such file or directory"


def test_a_record_missing_a_template_field_is_named():
    job = Job((Endpoint("e", "http://x"),), (LLMColumn("sum", "e", "{a}+{b}="),))
    with pytest.raises(JobError, match=r"column 'sum': its prompt uses \{b\}, which is neither a "
                       r"column \(sum\) nor a field of record 1 \(a, c\)"):  # fmt: skip
        check_records(job, [{"a": 1, "b": 2}, {"a": 1, "c": 2}])
    with pytest.raises(JobError, match="record 0 has the field 'sum'"):
        check_records(job, [{"a": 1, "b": 2, "sum": 3}])
    with pytest.raises(JobError, match="id 7 is used by an earlier record"):
        check_records(job, [{"id": 7, "a": 1, "b": 2}, {"id": 7, "a": 1, "b": 2}])


def test_templates_read_plain_names_only():
    assert template_fields("{a}+{b}={{c}} {a:>4}") == ("a", "b")
    assert render("{a}+{b}={{c}} {a:>4}", {"a": 1, "b": "x"}) == "1+x={c}    1"
    for bad in ("{}", "{0}", "{a[0]}", "{a.__class__}", "{a!r}", "{a:{b}}", "{a"):
        with pytest.raises(TemplateError):
            template_fields(bad)


def test_output_is_appended_and_a_torn_last_line_is_skipped(tmp_path):
    path = str(tmp_path / "out.jsonl")
    writer = OutputWriter(path)
    writer.write({"a": 1, "_index": 0, "_hash": "h1"})
    writer.close()
    with open(path, "a") as f:
        f.write('{"a": 2, "_ind')  # a run killed in the middle of a line
    assert list(read_output(path)) == [("hash", "h1")]
    writer = OutputWriter(path)
    writer.write({"a": 3, "_index": 1, "_hash": "h3"})
    writer.close()
    assert read_output(path)[("hash", "h3")]["a"] == 3
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[-1] == '{"a": 3, "_index": 1, "_hash": "h3"}'


def test_the_last_line_of_a_record_wins_and_compact_keeps_input_order(tmp_path):
    path = str(tmp_path / "out.jsonl")
    rows = [
        {"id": "y", "v": None, "_index": 1, "_errors": {"v": "HTTP 503"}},
        {"id": "x", "v": 1, "_index": 0},
        {"id": "y", "v": 2, "_index": 1},
    ]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert read_output(path)[("id", "y")]["v"] == 2
    assert compact_output(path, [{"id": "x"}, {"id": "y"}, {"id": "z"}]) == 2
    with open(path) as f:
        assert [json.loads(line)["id"] for line in f] == ["x", "y"]


def test_example_yaml_and_python_api_describe_the_same_job():
    example = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "pipeline"
    )
    sys.path.insert(0, example)
    try:
        import job_api

        assert load_job(os.path.join(example, "job.yaml")) == job_api.JOB
    finally:
        sys.path.remove(example)


FULL = """
endpoints:
  gen: {base_url: "http://127.0.0.1:1/v1", priority: higher-first, adaptive: false}
  gen2: {base_url: "http://127.0.0.1:3/v1"}
  judge: {base_url: "http://127.0.0.1:2/v1", response_format: true}
columns:
  answer: {endpoint: [gen, gen2], prompt: "{question}", allow_truncated: true}
  review:
    endpoint: judge
    api: chat
    system: "Grade {{ question }}"
    prompt: "{{ answer }}"
    syntax: jinja
    output_schema: {type: object, properties: {score: {type: integer}}, required: [score]}
    max_generations: 2
  sane: {python: "checks_mod:verified", validates: review}
stop: {error_rate: 0.2, window: 10}
"""


def test_every_key_of_the_job_file_reaches_the_python_objects(tmp_path):
    job = load_job(write_job(tmp_path, FULL))
    gen, _, judge = job.endpoints
    assert gen.priority == "higher-first" and gen.adaptive is False and judge.response_format
    answer, review, sane = job.columns
    assert answer.endpoints == ("gen", "gen2") and answer.allow_truncated
    assert review.system == "Grade {{ question }}" and review.inputs == ("answer", "question")
    assert review.output_schema["required"] == ["score"] and review.max_generations == 2
    assert sane.validates == "review" and sane.inputs == ("review",)
    assert (job.stop.error_rate, job.stop.window, job.stop.enabled) == (0.2, 10, True)
    assert job.graph.depth == {"answer": 0, "review": 1, "sane": 2}
