"""How the runner treats its endpoints, against in-process mock endpoints: the requests in
flight shrink on 429 and grow back (AIMD), a column spread over several endpoints fails over
when one goes down, a run whose cells keep failing stops early, chat columns send a system
prompt."""

from __future__ import annotations

import asyncio
import json
import time

from pipeserve.pipeline import Endpoint, Job, LLMColumn, RetryPolicy, run_job
from pipeserve.pipeline.endpoint.limit import AdaptiveLimit
from pipeserve.pipeline.endpoint.mock_server import MockConfig, MockThread
from pipeserve.pipeline.job.config import StopPolicy
from pipeserve.utils import free_port

QUICK = RetryPolicy(max_attempts=20, backoff_s=0.001, max_backoff_s=0.01)


def rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def overloads(adaptive: bool, tmp_path) -> tuple[int, int]:
    """429s a server that takes 2 requests at a time sends to a runner allowed 8, and the cells
    that failed (out of attempts)."""
    with MockThread(MockConfig(latency_s=0.01, concurrency=2, capacity=2)) as mock:
        endpoint = Endpoint("e", mock.url, max_concurrency=8, adaptive=adaptive)
        job = Job((endpoint,), (LLMColumn("echo", "e", "say {w}"),), QUICK)
        summary = run_job(job, [{"w": i} for i in range(80)], str(tmp_path / f"{adaptive}.jsonl"))
        return mock.servers[0].overloads, summary.cells_failed


def test_429s_halve_the_requests_in_flight(tmp_path):
    (fixed, _), (adaptive, failed) = overloads(False, tmp_path), overloads(True, tmp_path)
    assert fixed > 100  # 6 of 8 refused, round after round
    assert adaptive < fixed / 4 and failed == 0, (adaptive, fixed)


def test_the_limit_halves_on_overload_and_grows_back_on_success():
    async def scenario() -> list[int]:
        limit = AdaptiveLimit(8)
        seen = []
        limit.overloaded(None, time.monotonic())
        seen.append(int(limit.limit))
        limit.overloaded(None, 0.0)  # sent before that cut: the same round, no second cut
        seen.append(int(limit.limit))
        limit.overloaded(None, time.monotonic())
        seen.append(int(limit.limit))
        for _ in range(20):
            async with limit.slot():
                limit.succeeded()
        seen.append(int(limit.limit))
        for _ in range(100):
            limit.succeeded()
        seen.append(int(limit.limit))
        return seen

    assert asyncio.run(scenario()) == [4, 4, 2, 6, 8]  # +1/limit per success: 2 -> 6.x in 20


def test_retry_after_holds_new_requests_back():
    async def scenario() -> float:
        limit = AdaptiveLimit(4)
        limit.overloaded(0.2, time.monotonic())
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with limit.slot():
            return loop.time() - start

    assert asyncio.run(scenario()) >= 0.19


def two_endpoint_job(url_a: str, url_b: str) -> Job:
    endpoints = tuple(
        Endpoint(n, url, max_concurrency=2) for n, url in (("a", url_a), ("b", url_b))
    )
    retry = RetryPolicy(max_attempts=2, backoff_s=0.01)
    return Job(endpoints, (LLMColumn("echo", ("a", "b"), "say {w}"),), retry)


def test_a_column_on_two_endpoints_uses_both_and_fails_over_when_one_dies(tmp_path):
    with MockThread(MockConfig(latency_s=0.01), MockConfig(latency_s=0.01)) as mock:
        a, b = mock.servers

        def die_after_ten(path: str, request: dict):
            if len(a.bodies) == 10:
                asyncio.get_running_loop().create_task(a.stop())
            return a.complete(path, request)

        a.reply = die_after_ten
        out = tmp_path / "o.jsonl"
        summary = run_job(two_endpoint_job(a.url, b.url), [{"w": i} for i in range(100)], str(out))
        assert summary.cells_failed == 0 and summary.records_written == 100
        assert 10 <= len(a.bodies) <= 12 and len(b.bodies) >= 88
    assert sorted(r["echo"] for r in rows(out)) == sorted(f"<say {i}>" for i in range(100))


def test_an_endpoint_down_at_the_start_leaves_the_column_to_the_other(tmp_path):
    with MockThread() as mock:
        closed = f"http://127.0.0.1:{free_port()}/v1"
        summary = run_job(two_endpoint_job(closed, mock.url), [{"w": 1}], str(tmp_path / "o"))
        assert summary.cells_failed == 0 and len(mock.servers[0].bodies) == 1


def test_a_run_whose_cells_keep_failing_stops_early_and_says_why(tmp_path):
    def refuse(path: str, request: dict):
        return 400, {"error": {"message": "no such model"}}, {}

    with MockThread() as mock:
        mock.servers[0].reply = refuse
        job = Job(
            (Endpoint("e", mock.url, max_concurrency=2),),
            (LLMColumn("echo", "e", "say {w}"),),
            stop=StopPolicy(error_rate=0.5, window=20),
        )
        summary = run_job(job, [{"w": i} for i in range(500)], str(tmp_path / "o.jsonl"))
        sent = len(mock.servers[0].bodies)
    assert summary.stopped is not None and "20 of the last 20 cells failed" in summary.stopped
    assert "HTTP 400: no such model" in summary.stopped
    assert sent <= 22 and summary.records_written <= 22
    assert summary.records_unfinished == 500 - summary.records_written
    assert "run the same command again to resume" in summary.format()


def test_a_chat_column_sends_its_system_prompt_first(tmp_path):
    with MockThread() as mock:
        column = LLMColumn(
            "reply",
            "e",
            "Tags: {% for t in tags %}{{ t }}{{ ', ' if not loop.last }}{% endfor %}",
            api="chat",
            system="You are {{ persona }}.",
            syntax="jinja",
        )
        job = Job((Endpoint("e", mock.url),), (column,))
        run_job(job, [{"persona": "terse", "tags": ["a", "b"]}], str(tmp_path / "o.jsonl"))
        assert mock.servers[0].bodies[0]["messages"] == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tags: a, b"},
        ]
    assert rows(tmp_path / "o.jsonl")[0]["reply"] == "<Tags: a, b>"
