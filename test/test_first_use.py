"""What a new user meets first, through the real server with the embedded model: a prompt of
megabytes refused before it is tokenized, HEAD /health, chat top_logprobs without logprobs,
prompt tokens counted once per prompt, a client gone during the body read, a quiet shutdown."""

from __future__ import annotations

import concurrent.futures
import random
import socket
import time

import httpx
import pytest

from pipeserve.config import DEFAULT_MODEL_DIR
from pipeserve.frontend.tokenizer import load_tokenizer
from server_harness import Server

HTTP = httpx.Client(timeout=60)


@pytest.fixture(scope="module")
def server():
    srv = Server("--cpu-threads", "1")
    yield srv
    assert srv.stop() == 0
    assert "Task was destroyed but it is pending" not in srv.output()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_piece_bound_never_refuses_a_text_that_fits():
    from pipeserve.server.limits import PieceBound

    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    bound = PieceBound.of(tok)
    assert bound is not None
    rng = random.Random(0)
    refused = 0
    for _ in range(300):  # newline runs: one unknown token covers a whole run
        n = rng.randrange(1, 2000)
        text = "".join(
            rng.choice(["a", "1", " ", "\n" * rng.randrange(1, 50), "é"]) for _ in range(n)
        )
        tokens = len(tok.encode(text))
        for limit in {max(1, tokens // k) for k in (16, 8, 4)} | {tokens, tokens + 1}:
            if bound.at_least(text, limit):
                refused += 1
                assert tokens >= limit, (text, limit)
    assert refused > 100  # the prefix counts decide often
    assert bound.at_least("a" * 10_000_000, 256)
    assert not bound.at_least("\n" * 1_000_000, 3)


def test_a_prompt_of_megabytes_is_refused_at_once_and_costs_no_memory(server):
    before = peak_rss_mb(server.proc.pid)
    body = {"prompt": "12+34=" * 1_700_000, "max_tokens": 1}  # 10 MiB
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        answers = list(
            pool.map(lambda _: HTTP.post(f"{server.url}/v1/completions", json=body), range(2))
        )
        took = time.monotonic() - start
    for r in answers:
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"]["code"] == "context_length_exceeded"
    chat = {"messages": [{"role": "user", "content": "9" * 10_000_000}]}
    r = HTTP.post(f"{server.url}/v1/chat/completions", json=chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert took < 5, took
    assert peak_rss_mb(server.proc.pid) - before < 500
    assert HTTP.get(f"{server.url}/health").status_code == 200
    fits = {"prompt": "\n" * 1_000_000 + "1+1=", "max_tokens": 2}  # newline runs: few tokens
    assert HTTP.post(f"{server.url}/v1/completions", json=fits).status_code == 200


def prompt_tokens_total(srv: Server) -> float:
    for line in HTTP.get(f"{srv.url}/metrics").text.splitlines():
        if line.startswith("pipeserve_prompt_tokens_total "):
            return float(line.split()[1])
    raise KeyError("pipeserve_prompt_tokens_total")


def test_metrics_count_a_prompt_once_however_many_choices(server):
    before = prompt_tokens_total(server)
    body = {"prompt": ["1+2=", "3+4="], "n": 3, "max_tokens": 2, "temperature": 1.0}
    r = HTTP.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]["prompt_tokens"]
    assert prompt_tokens_total(server) - before == usage == 10  # 2 x (bos + 4 characters)


def test_head_health_answers_as_get_does(server):
    r = HTTP.head(f"{server.url}/health")
    assert r.status_code == 200 and r.content == b""


def test_chat_top_logprobs_without_logprobs_is_refused_naming_both(server):
    body = {"messages": [{"role": "user", "content": "1+1="}], "top_logprobs": 2}
    r = HTTP.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "top_logprobs" and "'logprobs': true" in error["message"]
    for extra in ({"logprobs": False, "top_logprobs": None}, {"logprobs": True, "top_logprobs": 2}):
        r = HTTP.post(f"{server.url}/v1/chat/completions", json={**body, **extra, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_a_client_gone_during_the_body_read_is_one_quiet_line(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        s.sendall(f'{head}Content-Type: application/json\r\n\r\n{{"prompt": '.encode())
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "client disconnected while sending" not in server.output():
        assert time.monotonic() < deadline, server.output()[-2000:]
        time.sleep(0.1)
    assert "Traceback" not in server.output() and " ERROR " not in server.output()
    assert HTTP.get(f"{server.url}/health").status_code == 200


def test_streams_cut_by_their_clients_leave_no_pending_task_behind(server):
    body = {"prompt": "1+2=", "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 2}

    def cut(_: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    return

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(cut, range(16)))
    time.sleep(1.0)
    assert HTTP.get(f"{server.url}/health").status_code == 200
    assert "Task was destroyed but it is pending" not in server.output()
