"""Every bound of the request edge, through the real server: sampling fields at huge, NaN, inf and
wrong-typed values on all three endpoints, what OpenAI refuses, the KV pool, the body size, and a
long prompt that must not stall /health. The server keeps serving throughout."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints import make_checkpoint
from server_harness import Server

KV_SLOTS = 96
BODY_CAP = 4 << 20
HUGE = "1" + "0" * 400  # parses, but no float holds it
HUGER = "1" + "0" * 5000  # past Python's 4300-digit limit: json.loads raises ValueError
NUMBERS_BAD = [HUGE, "-" + HUGE, HUGER, "-" + HUGER, "NaN", "Infinity", "-Infinity"]
TYPES_BAD = ['"1"', "[1]", "{}", "true"]
IDS_BAD = [f"[{v}]" for v in (HUGE, HUGER, "-1", "NaN", "1.5")]


def _fields(max_name: str, min_name: str) -> list[tuple[str, list[str]]]:
    """(field as the route names it, raw JSON values that must all be refused); the routes differ
    only in what they call the token limits."""
    numeric = [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "seed",
        max_name,
        min_name,
        "n",
    ]
    return [
        *((name, NUMBERS_BAD + TYPES_BAD) for name in numeric),
        ("stop", [*NUMBERS_BAD, "[1]", "{}", "true"]),
        ("stop_token_ids", [*NUMBERS_BAD, '"1"', "{}", "true", *IDS_BAD]),
        ("ignore_eos", [*NUMBERS_BAD, '"1"', "[1]", "{}"]),
    ]


OPENAI_FIELDS = [
    *_fields("max_tokens", "min_tokens"),
    ("stream", [*NUMBERS_BAD, '"1"', "[1]", "{}"]),
]
GENERATE_FIELDS = _fields("max_new_tokens", "min_new_tokens")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_checkpoint(str(tmp_path_factory.mktemp("limits")), "llama", layers=2)
    srv = Server(
        "--model-path",
        path,
        "--cpu-threads",
        "1",
        "--max-total-tokens",
        str(KV_SLOTS),
        "--max-request-body-bytes",
        str(BODY_CAP),
    )
    yield srv
    assert srv.stop() == 0


HTTP = httpx.Client(timeout=60)  # one connection pool: a client per request costs ~50 ms


def post(srv: Server, route: str, body: dict | bytes) -> httpx.Response:
    data = {"content": body} if isinstance(body, bytes) else {"json": body}
    return HTTP.post(f"{srv.url}{route}", **data)


def refused(r: httpx.Response, param: str, status: int = 400) -> dict:
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["param"] == param, error
    return error


def assert_serving(srv: Server) -> None:
    assert HTTP.get(f"{srv.url}/health").status_code == 200
    r = post(srv, "/v1/completions", {"prompt": "12", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def metrics(srv: Server) -> dict[str, float]:
    text = HTTP.get(f"{srv.url}/metrics").text
    return {
        s.name + ("{" + ",".join(s.labels.values()) + "}" if s.labels else ""): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_kv_slots_free_reads_the_pool_from_start_up_and_latencies_are_histograms(server):
    first = metrics(server)
    assert first["pipeserve_kv_slots_total"] == KV_SLOTS
    assert first["pipeserve_kv_slots_free"] == KV_SLOTS
    assert_serving(server)
    after = metrics(server)
    for name in (
        "pipeserve_time_to_first_token_seconds",
        "pipeserve_time_per_output_token_seconds",
        "pipeserve_e2e_request_latency_seconds",
    ):
        assert after[f"{name}_count"] >= 1 and after[f"{name}_bucket{{+Inf}}"] >= 1, name
    assert "pipeserve_request_queue_time_seconds_count" in after
    assert after["pipeserve_requests_total{ok}"] >= 1
    assert after["pipeserve_generation_tokens_total"] >= 3
    assert after["pipeserve_kv_slots_free"] == KV_SLOTS  # freed again


def _openai_body(route: str, field: str, value: str) -> bytes:
    head = (
        '"prompt": "12"'
        if route == "/v1/completions"
        else '"messages": [{"role": "user", "content": "12"}]'
    )
    extra = ', "max_tokens": 4' if field != "max_tokens" else ""
    return f'{{{head}{extra}, "{field}": {value}}}'.encode()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_every_openai_sampling_field_refuses_huge_nan_inf_and_wrong_types(server, route):
    for field, values in OPENAI_FIELDS:
        for value in values:
            r = post(server, route, _openai_body(route, field, value))
            refused(r, field)
    for field, value in (("logprobs", HUGE), ("logprobs", "NaN"), ("logprobs", '"1"')):
        if route == "/v1/completions":
            refused(post(server, route, _openai_body(route, field, value)), field)
    chat_logprobs = '{"messages": [{"role": "user", "content": "1"}], "logprobs": true, '
    for value in (HUGE, HUGER, "NaN", "Infinity", '"1"'):
        if route == "/v1/chat/completions":
            r = post(server, route, f'{chat_logprobs}"top_logprobs": {value}}}'.encode())
            refused(r, "top_logprobs")
    assert_serving(server)


def test_every_generate_field_refuses_huge_nan_inf_and_wrong_types(server):
    for field, values in GENERATE_FIELDS:
        for value in values:
            extra = '"max_new_tokens": 4, ' if field != "max_new_tokens" else ""
            body = f'{{"text": "12", "sampling_params": {{{extra}"{field}": {value}}}}}'
            refused(post(server, "/generate", body.encode()), f"sampling_params.{field}")
    for value in (HUGE, HUGER, "NaN", '"1"', "-1", "21"):
        body = f'{{"text": "12", "return_logprob": true, "top_logprobs_num": {value}}}'
        body = body.replace(
            '"text": "12"', '"text": "12", "sampling_params": {"max_new_tokens": 4}'
        )
        refused(post(server, "/generate", body.encode()), "top_logprobs_num")
    for value in (HUGE, HUGER, "NaN", "[[1, 2], " + HUGE + "]"):
        refused(post(server, "/generate", f'{{"input_ids": {value}}}'.encode()), "input_ids")
    assert_serving(server)


CHAT = {"messages": [{"role": "user", "content": "12"}]}
REFUSED = [  # accepted with 200 before: (route, body, param)
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": ["ab", ""]}, "prompt"),
    ("/v1/completions", {"prompt": ["ab"] * 2049}, "prompt"),
    ("/v1/completions", {"prompt": "ab", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "ab", "seed": 2**63}, "seed"),
    ("/v1/completions", {"prompt": "ab", "seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"prompt": "ab", "stop": "x" * (1 << 20)}, "stop"),
    ("/v1/completions", {"prompt": "ab", "stop": [f"s{i}" for i in range(10_000)]}, "stop"),
    ("/v1/completions", {"prompt": "ab", "n": 100_000}, "n"),
    ("/v1/completions", {"prompt": "ab", "stop_token_ids": [128]}, "stop_token_ids"),
    (
        "/v1/completions",
        {"prompt": "ab", "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    (
        "/v1/completions",
        {"prompt": "ab", "stream": True, "stream_options": "yes"},
        "stream_options",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        "messages[0].role",
    ),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": 100_000}, "n"),
    ("/generate", {"text": ""}, "text"),
    ("/generate", {"text": ["ab", ""]}, "text"),
    ("/generate", {"text": "ab", "sampling_params": {"n": 100_000}}, "sampling_params.n"),
    ("/generate", {"text": "ab", "sampling_params": {"n": 17}}, "sampling_params.n"),
    (
        "/generate",
        {"text": "ab", "sampling_params": {"stop": ["s"] * 10_000}},
        "sampling_params.stop",
    ),
    (
        "/generate",
        {"text": "ab", "sampling_params": {"stop": "x" * (1 << 20)}},
        "sampling_params.stop",
    ),
    (
        "/generate",
        {"text": "ab", "sampling_params": {"max_new_tokens": 0}},
        "sampling_params.max_new_tokens",
    ),
    ("/generate", {"text": "ab", "sampling_params": {"seed": 2**64}}, "sampling_params.seed"),
]


def test_what_openai_refuses_is_refused_naming_the_field(server):
    for route, body, param in REFUSED:
        refused(post(server, route, body), param)
    assert_serving(server)


def test_a_request_that_cannot_fit_the_kv_pool_is_refused_not_cut_short(server):
    prompt = "abcde"  # 5 tokens: one per character
    error = refused(
        post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 136}), "max_tokens"
    )
    assert error["code"] == "kv_pool_exceeded" and f"holds {KV_SLOTS} tokens" in error["message"]
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 136}}
    refused(post(server, "/generate", body), "sampling_params.max_new_tokens")
    fits = KV_SLOTS - len(prompt)
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": fits, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == fits
    chat = post(server, "/v1/chat/completions", {**CHAT, "ignore_eos": True})  # default: the rest
    assert chat.status_code == 200, chat.text
    usage = chat.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == KV_SLOTS


def test_body_over_the_cap_is_413_declared_or_streamed(server):
    big = b'{"prompt": "' + b"a" * (BODY_CAP + 1) + b'"}'
    error = refused(post(server, "/v1/completions", big), None, status=413)
    assert error["code"] == "request_too_large" and str(BODY_CAP) in error["message"]

    def chunks():
        for _ in range(5):
            yield b"a" * (1 << 20)

    r = HTTP.post(f"{server.url}/generate", content=chunks())  # chunked: no length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert_serving(server)


def test_long_prompts_are_tokenized_off_the_event_loop(server):
    """2048 prompts that each pass the bound before tokenizing take a while to tokenize; /health
    answers meanwhile (tokenized on the event loop, /health would wait as long as the request)."""
    body = {"prompt": ["a" * (KV_SLOTS - 6)] * 2048, "max_tokens": 10}
    with concurrent.futures.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as health:
        start = time.monotonic()
        big = pool.submit(post, server, "/v1/completions", body)
        waits = []
        while not big.done():
            asked = time.monotonic()
            assert health.get(f"{server.url}/health").status_code == 200
            waits.append(time.monotonic() - asked)
            time.sleep(0.02)
        error = refused(big.result(), "max_tokens")
        took = time.monotonic() - start
    assert error["code"] == "kv_pool_exceeded"
    assert len(waits) >= 5 and max(waits) < took / 4, (took, waits)


def test_priority_is_taken_on_every_route_and_bounded(server):
    """Stage 0 admits by (priority, arrival); the ordering itself is tested on the scheduler
    (test_overlap.py). Here: every route takes the field, and refuses what is not a bounded int."""
    bodies = {
        "/v1/completions": {"prompt": "12", "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "1"}], "max_tokens": 2},
        "/generate": {"text": "12", "sampling_params": {"max_new_tokens": 2}},
    }
    for route, body in bodies.items():
        assert post(server, route, {**body, "priority": -3}).status_code == 200
        for bad in (2**40, "1", 1.5, True):
            refused(post(server, route, {**body, "priority": bad}), "priority")
    assert_serving(server)
