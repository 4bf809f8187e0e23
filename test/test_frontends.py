"""Several HTTP front-end processes on one port (`--api-server-count`), through the real server:
requests land on all of them and get the same answers, `/metrics` sums them, `--stream-interval`
coalesces chunks, SIGTERM drains every one, and a dead rank or front end fails the whole group."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx

from server_harness import Server

PROMPTS = [f"{a}+{b}=" for a, b in ((12, 34), (250, 99), (7, 8), (401, 17))]
ANSWERS = {p: str(eval(p[:-1])) for p in PROMPTS}  # the embedded model adds correctly


def complete(url: str, prompt: str, **extra: object) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}  # extra may override
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)  # a new connection each


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def stream_events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    return [json.loads(line[6:]) for line in lines]


def processes(srv: Server, prefix: str) -> list[int]:
    found = []
    for pid in srv.children_alive():
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if f.read().startswith(prefix):
                    found.append(pid)
        except OSError:
            pass
    return found


def test_three_front_ends_answer_alike_and_their_metrics_add_up():
    srv = Server("--api-server-count", "3", "--cpu-threads", "1", "--stream-interval", "3")
    try:
        # the first 200 from /health: the launcher serves too (front ends that served alone
        # before it did once let a SIGTERM find it still starting, and kill it)
        assert "pipeserve ready at" in srv.output()
        assert len(processes(srv, "pipeserve-frontend")) == 2  # besides the launcher's own
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: complete(srv.url, p), PROMPTS * 6))
        assert [r.status_code for r in answers] == [200] * 24
        assert [r.json()["choices"][0]["text"] for r in answers] == [
            ANSWERS[p] for p in PROMPTS * 6
        ]
        for _ in range(6):  # each scrape reaches one process; every one sums all three
            assert metric(srv.url, 'pipeserve_requests_total{status="ok"}') == 24
        assert metric(srv.url, "pipeserve_prompt_tokens_total") == sum(
            len(r.json()["choices"]) and r.json()["usage"]["prompt_tokens"] for r in answers
        )
        body = {"prompt": PROMPTS[0], "max_tokens": 7, "ignore_eos": True, "temperature": 0}
        extra = {"logprobs": 0, "stream_options": {"include_usage": True}}
        chunks = stream_events(srv.url, {**body, **extra})
        texts = [c["choices"][0] for c in chunks if c["choices"]]
        sizes = [len(t["logprobs"]["tokens"]) for t in texts]
        assert sum(sizes) == 7 and min(sizes[:-1]) >= 3  # --stream-interval 3: only the last less
        assert texts[-1]["finish_reason"] == "length"
        whole = complete(srv.url, **body).json()["choices"][0]["text"]
        assert "".join(t["text"] for t in texts) == whole
        assert chunks[-1]["usage"]["completion_tokens"] == 7
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0, srv.output()[-3000:]
    assert srv.leftovers() == []


def test_disconnects_on_any_front_end_abort_and_free_the_kv_and_bad_input_is_a_400():
    srv = Server("--api-server-count", "2", "--cpu-threads", "1")
    try:
        free = metric(srv.url, "pipeserve_kv_slots_free")
        body = {"prompt": "1+1=", "max_tokens": 200, "ignore_eos": True, "stream": True}
        for _ in range(6):  # new connections: both front ends get some
            with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > 4:
                        break
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            metric(srv.url, "pipeserve_running_requests")
            or metric(srv.url, "pipeserve_kv_slots_free") != free
        ):
            time.sleep(0.2)
        for _ in range(4):  # every front end's view: nothing runs, every slot is free
            assert metric(srv.url, "pipeserve_running_requests") == 0
            assert metric(srv.url, "pipeserve_kv_slots_free") == free
            assert metric(srv.url, 'pipeserve_requests_total{status="aborted"}') == 6
        for bad in ({"prompt": ""}, {"prompt": 42}, {"prompt": "x", "max_tokens": -1}) * 2:
            r = httpx.post(f"{srv.url}/v1/completions", json=bad, timeout=10)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert complete(srv.url, PROMPTS[0]).json()["choices"][0]["text"] == ANSWERS[PROMPTS[0]]
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0 and srv.leftovers() == []


def test_a_dead_rank_fails_every_front_end_and_the_group_exits():
    srv = Server("--api-server-count", "2", "--cpu-threads", "1")
    try:
        [rank] = processes(srv, "pipeserve-rank")
        os.kill(rank, signal.SIGKILL)
        time.sleep(0.3)
        for r in [complete(srv.url, PROMPTS[0]) for _ in range(6)]:  # both front ends
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            assert "rank 0 (pipeserve-rank0) was killed by SIGKILL" in r.json()["error"]["message"]
        assert srv.proc.wait(30) != 0
        assert srv.leftovers() == []
    finally:
        srv.stop(signal.SIGKILL)


def test_a_dead_front_end_is_a_failure_of_the_group():
    srv = Server("--api-server-count", "2", "--cpu-threads", "1")
    try:
        [frontend] = processes(srv, "pipeserve-frontend")
        os.kill(frontend, signal.SIGKILL)
        # the ranks still live: told to stop, they exit well within the launcher's grace period
        # of 10 s (they waited it out, then were killed)
        assert srv.proc.wait(8) != 0
        assert "engine failed: front end 1 (pipeserve-frontend1) exited" in srv.output()
        assert srv.leftovers() == []
    finally:
        srv.stop(signal.SIGKILL)
