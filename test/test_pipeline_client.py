"""The runner's HTTP client against a real (stdlib) HTTP server on 127.0.0.1 that fails on
purpose: what it retries, what it does not, and what a cell's error says."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeserve.pipeline import (
    Endpoint,
    Job,
    JobError,
    LLMColumn,
    RetryPolicy,
    run_job,
    run_job_async,
)
from pipeserve.pipeline.io import digest
from pipeserve.utils import free_port


class Script:
    """Statuses to answer in turn (then 200); records every request body."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.owned_by = "someone"  # what GET /v1/models says
        self.strict = False  # a 400 for fields outside the OpenAI API, as OpenAI's own API does
        self.die_after: int | None = None  # POSTs answered before the server closes its socket


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            models = {"data": [{"id": "m", "object": "model", "owned_by": script.owned_by}]}
            self.answer(200, models)

        def answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.bodies.append(body)
            script.paths.append(self.path)
            status = script.statuses.pop(0) if script.statuses else 200
            prompts = body.get("prompt") or body["messages"][0]["content"]
            prompts = prompts if isinstance(prompts, list) else [prompts]
            if any("bad" in p for p in prompts) or (script.strict and "priority" in body):
                status = 400
            if any("boom" in p for p in prompts):
                status = 500  # a prompt that crashes the server, every time
            if status == 200:
                key = "text" if "prompt" in body else "message"
                choices = [
                    {
                        "index": i,
                        "finish_reason": "stop",
                        key: f"<{p}>" if key == "text" else {"content": f"<{p}>"},
                    }
                    for i, p in enumerate(prompts)
                ][::-1]  # out of order: the client must sort by index
                usage = {"prompt_tokens": 2 * len(prompts), "completion_tokens": len(prompts)}
                payload = {"choices": choices, "usage": usage}
            else:
                payload = {"error": {"message": f"status {status} on purpose"}}
            if script.die_after is not None and len(script.bodies) >= script.die_after:
                httpd.shutdown()  # from a request thread: serve_forever runs in another
                httpd.server_close()
            self.answer(status, payload)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", script
    httpd.shutdown()
    httpd.server_close()


def job(url: str, api: str = "completions", attempts: int = 3, batch: int = 1) -> Job:
    return Job(
        (Endpoint("e", url, model="m", max_concurrency=1, max_batch_size=batch),),
        (LLMColumn("echo", "e", "say {w}", api=api, params={"max_tokens": 4}),),
        RetryPolicy(max_attempts=attempts, backoff_s=0.01, max_backoff_s=0.05),
    )


def rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_request_body_carries_params_and_model(server, tmp_path):
    url, script = server
    summary = run_job(job(url, api="chat"), [{"w": "hi"}], str(tmp_path / "o.jsonl"))
    assert script.paths == ["/v1/chat/completions"]
    assert script.bodies == [
        {"max_tokens": 4, "model": "m", "messages": [{"role": "user", "content": "say hi"}]}
    ]
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "finish_reason": "stop", "generations": 1}
    assert rows(tmp_path / "o.jsonl") == [
        {
            "w": "hi",
            "echo": "<say hi>",
            "_index": 0,
            "_hash": digest({"w": "hi"}),
            "_usage": {"echo": usage},
        }
    ]
    assert summary.columns["echo"].prompt_tokens == 2


def test_429_and_5xx_are_retried_until_an_answer(server, tmp_path):
    url, script = server
    script.statuses = [429, 503]
    summary = run_job(job(url), [{"w": "x"}], str(tmp_path / "o.jsonl"))
    assert len(script.bodies) == 3 and summary.cells_failed == 0
    assert rows(tmp_path / "o.jsonl")[0]["echo"] == "<say x>"


def test_out_of_attempts_is_a_cell_error_in_the_output(server, tmp_path):
    url, script = server
    script.statuses = [500, 502, 500]
    summary = run_job(job(url), [{"w": "x"}, {"w": "y"}], str(tmp_path / "o.jsonl"))
    assert summary.cells_failed == 1 and summary.columns["echo"].done == 1
    by_index = {r["_index"]: r for r in rows(tmp_path / "o.jsonl")}
    assert by_index[0]["echo"] is None
    assert by_index[0]["_errors"] == {"echo": "HTTP 500: status 500 on purpose (after 3 attempts)"}
    assert by_index[1]["echo"] == "<say y>"


def test_a_client_error_is_not_retried(server, tmp_path):
    url, script = server
    script.statuses = [400]
    run_job(job(url), [{"w": "x"}], str(tmp_path / "o.jsonl"))
    assert len(script.bodies) == 1
    assert rows(tmp_path / "o.jsonl")[0]["_errors"] == {"echo": "HTTP 400: status 400 on purpose"}


def test_a_batch_goes_in_one_request_and_answers_map_back_by_index(server, tmp_path):
    url, script = server
    words = [{"w": w} for w in "abcde"]
    summary = run_job(job(url, batch=3), words, str(tmp_path / "o.jsonl"))
    assert [b["prompt"] for b in script.bodies] == [["say a", "say b", "say c"], ["say d", "say e"]]
    assert {r["w"]: r["echo"] for r in rows(tmp_path / "o.jsonl")} == {
        w: f"<say {w}>" for w in "abcde"
    }
    assert summary.columns["echo"].requests == 2 and summary.columns["echo"].prompt_tokens == 10


def test_a_refused_batch_is_resent_prompt_by_prompt_so_only_the_bad_cell_fails(server, tmp_path):
    url, script = server
    words = [{"w": "ok1"}, {"w": "bad"}, {"w": "ok2"}]
    summary = run_job(job(url, batch=3), words, str(tmp_path / "o.jsonl"))
    assert [b["prompt"] for b in script.bodies] == [
        ["say ok1", "say bad", "say ok2"], "say ok1", "say bad", "say ok2"
    ]  # fmt: skip
    by_word = {r["w"]: r for r in rows(tmp_path / "o.jsonl")}
    assert by_word["ok1"]["echo"] == "<say ok1>" and by_word["ok2"]["echo"] == "<say ok2>"
    assert by_word["bad"]["_errors"] == {"echo": "HTTP 400: status 400 on purpose"}
    assert summary.cells_failed == 1


def test_a_batch_that_keeps_failing_with_a_5xx_is_resent_prompt_by_prompt(server, tmp_path):
    url, script = server
    words = [{"w": "ok1"}, {"w": "boom"}, {"w": "ok2"}]
    summary = run_job(job(url, attempts=2, batch=3), words, str(tmp_path / "o.jsonl"))
    batch = ["say ok1", "say boom", "say ok2"]
    sent = [b["prompt"] for b in script.bodies]
    assert sent[:2] == [batch, batch]  # the batch, out of attempts; then each prompt alone
    assert sorted(sent[2:]) == ["say boom", "say boom", "say ok1", "say ok2"]
    by_word = {r["w"]: r for r in rows(tmp_path / "o.jsonl")}
    assert by_word["ok1"]["echo"] == "<say ok1>" and by_word["ok2"]["echo"] == "<say ok2>"
    assert by_word["boom"]["_errors"] == {
        "echo": "HTTP 500: status 500 on purpose (after 2 attempts)"
    }
    assert summary.cells_failed == 1


def test_an_endpoint_that_refuses_unknown_fields_gets_no_priority(server, tmp_path):
    url, script = server
    script.strict = True
    summary = run_job(job(url), [{"w": str(i)} for i in range(20)], str(tmp_path / "o.jsonl"))
    assert summary.cells_failed == 0 and len(script.bodies) == 20
    assert all("priority" not in b for b in script.bodies)


@pytest.mark.parametrize(
    "owned_by, order, sent",
    [
        ("pipeserve", "auto", 0),  # pipeserve schedules lower values first
        ("someone", "auto", None),
        ("someone", "lower-first", 0),  # vLLM, SGLang with --schedule-low-priority-values-first
        ("someone", "higher-first", 0),  # SGLang's default
        ("pipeserve", "off", None),
    ],
)
def test_priority_is_sent_where_the_server_is_pipeserve_or_the_job_asks(
    server, tmp_path, owned_by, order, sent
):
    url, script = server
    script.owned_by = owned_by
    endpoint = Endpoint("e", url, max_concurrency=1, priority=order)
    two = Job(
        (endpoint,),
        (LLMColumn("gen", "e", "say {w}"), LLMColumn("judge", "e", "judge {gen}")),
    )
    run_job(two, [{"w": "x"}], str(tmp_path / "o.jsonl"))
    priorities = {b["prompt"].split()[0]: b.get("priority") for b in script.bodies}
    if sent is None:
        assert priorities == {"say": None, "judge": None}
    elif order == "higher-first":
        assert priorities == {"say": -1, "judge": 0}  # the judge still goes first
    else:
        assert priorities == {"say": 1, "judge": 0}


def test_a_closed_port_fails_before_anything_is_sent(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    records = [{"w": str(i)} for i in range(2000)]
    start = time.monotonic()
    with pytest.raises(
        JobError, match=r"endpoint 'e' \(http://127.0.0.1:\d+/v1\) cannot be reached"
    ):
        asyncio.run(asyncio.wait_for(run_job_async(job(url), records, str(tmp_path / "o")), 10))
    assert time.monotonic() - start < 5 and not (tmp_path / "o").exists()


def test_a_server_that_dies_mid_run_fails_the_rest_at_once(server, tmp_path):
    url, script = server
    script.die_after = 5  # then the listening socket closes: connections are refused
    records = [{"w": str(i)} for i in range(300)]
    start = time.monotonic()
    summary = asyncio.run(
        asyncio.wait_for(run_job_async(job(url, attempts=3), records, str(tmp_path / "o")), 20)
    )
    assert time.monotonic() - start < 5
    assert summary.columns["echo"].done == 5 and summary.cells_failed == 295
    errors = [r["_errors"]["echo"] for r in rows(tmp_path / "o") if "_errors" in r]
    assert "endpoint 'e' is down" in errors[-1] and "ConnectError" in errors[-1]
