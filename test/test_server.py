"""End to end through the real HTTP server: the OpenAI SDK, concurrency, bad input, disconnects."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import socket
import time

import httpx
import openai
import pytest

from checkpoints import make_checkpoint
from pipeserve import Engine
from pipeserve.frontend.tokenizer import load_tokenizer
from pipeserve.utils import free_port
from server_harness import Server

WORDS = ["hello", "the cat", "1+2=", "pipeline", "abc def ghi", "x", "OpenAI", "zz top"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_checkpoint(
        str(tmp_path_factory.mktemp("srv")), "llama", layers=4, heads=4, kv_heads=2
    )


@pytest.fixture(scope="module")
def expected(model_path):
    """Greedy answers of Engine.generate, keyed by prompt text (raw and chat-templated)."""
    tok = load_tokenizer(model_path)
    chats = {
        w: tok.apply_chat_template(
            [{"role": "user", "content": w}], add_generation_prompt=True, tokenize=False
        )
        for w in WORDS
    }
    prompts = [f"{w} {i}" for i in range(25) for w in WORDS]
    with Engine(model_path=model_path, device="cpu") as engine:
        raw = engine.generate([*prompts, *WORDS], {"temperature": 0, "max_new_tokens": 12})
        chat = engine.generate(
            [tok.encode(c, add_special_tokens=False) for c in chats.values()],
            {"temperature": 0, "max_new_tokens": 10},
        )
    return {
        "raw": {p: o["text"] for p, o in zip([*prompts, *WORDS], raw, strict=True)},
        "chat": {w: o["text"] for w, o in zip(WORDS, chat, strict=True)},
        "prompts": prompts,
    }


@pytest.fixture(scope="module", params=[1, 2], ids=["pp1", "pp2"])
def server(request, model_path):
    srv = Server(
        "--model-path",
        model_path,
        "--pp-size",
        str(request.param),
        "--cpu-threads",
        "1",
        "--served-model-name",
        "tiny",
    )
    yield srv
    assert srv.stop() == 0


def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def test_openai_sdk_completion_and_chat_equal_engine(server, expected):
    c = client(server)
    for w in WORDS[:4]:
        out = c.completions.create(model="tiny", prompt=w, max_tokens=12, temperature=0)
        assert out.choices[0].text == expected["raw"][w]
        assert out.usage.completion_tokens <= 12
        chat = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": w}], max_tokens=10, temperature=0
        )
        assert chat.choices[0].message.content == expected["chat"][w]
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_streaming_matches_non_streaming_and_usage_comes_when_asked(server, expected):
    c = client(server)
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": WORDS[0]}],
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected["chat"][WORDS[0]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    parts = list(
        c.completions.create(
            model="tiny", prompt=WORDS[1], max_tokens=12, temperature=0, stream=True
        )
    )
    assert all(p.choices and p.usage is None for p in parts)  # OpenAI: usage only when asked
    assert "".join(p.choices[0].text for p in parts) == expected["raw"][WORDS[1]]


def test_streamed_logprobs_equal_non_streamed_ones_text_offsets_included(server):
    body = {"prompt": WORDS[5], "max_tokens": 8, "temperature": 0, "logprobs": 1}
    whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    merged: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": []}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                for key in merged:
                    merged[key] += lp[key]
    want = whole["choices"][0]["logprobs"]
    assert merged["tokens"] == want["tokens"] and merged["text_offset"] == want["text_offset"]
    assert merged["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
    assert want["text_offset"][-1] > 0


def test_openai_edge_values_are_served_as_openai_does(server, expected, model_path):
    c = client(server)
    greedy = c.completions.create(model="tiny", prompt=WORDS[0], max_tokens=12, top_p=0)
    assert greedy.choices[0].text == expected["raw"][WORDS[0]]  # top_p=0 keeps the top token
    r = httpx.post(
        f"{server.url}/v1/completions", json={"model": "gpt-17", "prompt": "hi"}, timeout=30
    )
    error = r.json()["error"]
    assert r.status_code == 404 and error["code"] == "model_not_found"
    assert "'tiny'" in error["message"] and "/" not in error["message"]
    tok = load_tokenizer(model_path)
    empty = tok.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False
    )
    overhead = len(tok.encode(empty, add_special_tokens=False))  # one token per "y" on top
    # over the context (512), and filling it exactly: no room for even one token
    for content in ("y" * 600, "y" * (512 - overhead)):
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": content}]},
            timeout=30,
        )
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded", r.text
        assert error["param"] == "messages"


def test_logprobs_and_list_of_parts(server, expected):
    c = client(server)
    chat = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [{"type": "text", "text": WORDS[2]}]}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert chat.choices[0].message.content == expected["chat"][WORDS[2]]
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(
        len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        for e in content
    )
    comp = c.completions.create(
        model="tiny", prompt=WORDS[3], max_tokens=5, temperature=0, logprobs=2
    )
    assert len(comp.choices[0].logprobs.token_logprobs) == comp.usage.completion_tokens
    assert all(len(t) <= 2 for t in comp.choices[0].logprobs.top_logprobs)


def test_native_generate(server, expected):
    r = httpx.post(
        f"{server.url}/generate",
        json={"text": WORDS[4], "sampling_params": {"temperature": 0, "max_new_tokens": 12}},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["text"] == expected["raw"][WORDS[4]]
    batch = httpx.post(
        f"{server.url}/generate",
        json={"text": WORDS[:2], "sampling_params": {"temperature": 0, "max_new_tokens": 12}},
        timeout=60,
    ).json()
    assert [b["text"] for b in batch] == [expected["raw"][w] for w in WORDS[:2]]


def test_200_concurrent_requests_complete_correctly(server, expected):
    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as http:

            async def one(p: str) -> str:
                r = await http.post(
                    f"{server.url}/v1/completions",
                    json={"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0},
                )
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            return await asyncio.gather(*(one(p) for p in expected["prompts"]))

    assert len(expected["prompts"]) == 200
    assert asyncio.run(run()) == [expected["raw"][p] for p in expected["prompts"]]


def metric(srv: Server, name: str) -> float:
    for line in httpx.get(f"{srv.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_client_disconnect_aborts_and_frees_kv(server):
    free = metric(server, "pipeserve_kv_slots_free")
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"prompt": "long", "max_tokens": 400, "ignore_eos": True, "stream": True},
        timeout=60,
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        metric(server, "pipeserve_running_requests")
        or metric(server, "pipeserve_kv_slots_free") != free
    ):
        time.sleep(0.2)
    assert metric(server, "pipeserve_running_requests") == 0
    assert metric(server, "pipeserve_kv_slots_free") == free
    assert metric(server, "pipeserve_generation_tokens_total") > 0


BAD_REQUESTS = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[1, 2]"),
    ("/v1/completions", b'"just a string"'),
    ("/v1/completions", {}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": 42}),
    ("/v1/completions", {"prompt": [1, "a"]}),
    ("/v1/completions", {"prompt": [100000]}),
    ("/v1/completions", {"prompt": [-1]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}),
    ("/v1/completions", {"prompt": "hi", "top_p": -0.1}),
    ("/v1/completions", {"prompt": [[1, 2], 3]}),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-300, "logprobs": 2}),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-300, "stream": True}),
    ("/v1/completions", {"prompt": "hi", "n": 0}),
    ("/v1/completions", {"prompt": "hi", "n": 100}),
    ("/v1/completions", {"prompt": "hi", "stop": 5}),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}),
    ("/v1/completions", {"prompt": "hi", "echo": True}),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}),
    ("/v1/completions", {"prompt": "hi", "seed": 1.5}),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-17"}),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}),
    ("/v1/completions", {"prompt": "x" * 600, "max_tokens": 1}),
    ("/v1/chat/completions", {}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99, "logprobs": True},
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema"},
        },
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    ),
    ("/generate", {}),
    ("/generate", {"text": "a", "input_ids": [1]}),
    ("/generate", {"text": "a", "sampling_params": {"temprature": 1}}),
    ("/generate", {"input_ids": [[]]}),
    ("/v1/nothing-here", {}),
]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, expected):
    assert len(BAD_REQUESTS) >= 30
    for path, body in BAD_REQUESTS:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(f"{server.url}{path}", timeout=30, **kwargs)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert "message" in r.json()["error"], r.text
    out = client(server).completions.create(
        model="tiny", prompt=WORDS[0], max_tokens=12, temperature=0
    )
    assert out.choices[0].text == expected["raw"][WORDS[0]]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_queue_bound_answers_503_with_a_reason_and_loses_nothing_admitted(model_path):
    srv = Server("--model-path", model_path, "--cpu-threads", "1", "--max-queued-requests", "2")
    try:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"prompt": "q", "max_tokens": 150, "ignore_eos": True}
                return await asyncio.gather(
                    *(http.post(f"{srv.url}/v1/completions", json=body) for _ in range(6))
                )

        codes = [r.status_code for r in asyncio.run(burst())]
        assert codes.count(200) >= 2 and 503 in codes and set(codes) <= {200, 503}
        full = next(r for r in asyncio.run(burst()) if r.status_code == 503)
        assert full.json()["error"]["code"] == "queue_full"
        # a request needing more sequences than the bound can never fit: 400, not a retryable 503
        for stream in (False, True):
            body = {"prompt": "q", "max_tokens": 2, "n": 3, "stream": stream}
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        # a stream refused at admission gets its 503 as the response's status, before any event
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"prompt": "q", "max_tokens": 480, "ignore_eos": True, "n": 2}
            busy = pool.submit(httpx.post, f"{srv.url}/v1/completions", json=body, timeout=120)
            deadline = time.monotonic() + 30
            while metric(srv, "pipeserve_running_requests") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            body = {"prompt": "q", "max_tokens": 2, "stream": True}
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
            assert busy.result().status_code == 200
        r = httpx.post(
            f"{srv.url}/v1/completions", json={"prompt": "q", "max_tokens": 3}, timeout=60
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        srv.stop()


def test_two_servers_side_by_side_and_sigint_sigterm_clean_up(model_path):
    a = Server("--model-path", model_path, "--cpu-threads", "1")
    b = Server("--model-path", model_path, "--cpu-threads", "1")
    try:
        for srv in (a, b):
            r = httpx.post(
                f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60
            )
            assert r.status_code == 200
    finally:
        codes = [a.stop(signal.SIGINT), b.stop(signal.SIGTERM)]
    assert codes == [0, 0]
    assert a.leftovers() == [] and b.leftovers() == []
    assert _port_free(a.port) and _port_free(b.port)
    for srv in (a, b):  # a quiet end: no teardown reports (Triton's bindings, semaphores)
        assert "leaked" not in srv.output() and "Traceback" not in srv.output(), srv.output()


def test_two_node_launch_on_loopback(model_path, expected):
    addr = f"127.0.0.1:{free_port()}"
    common = [
        "--model-path",
        model_path,
        "--pp-size",
        "2",
        "--nnodes",
        "2",
        "--dist-init-addr",
        addr,
        "--cpu-threads",
        "1",
    ]
    worker = Server(*common, "--node-rank", "1", ready=False)
    head = Server(*common, "--node-rank", "0", "--served-model-name", "tiny")
    try:
        out = client(head).completions.create(
            model="tiny", prompt=WORDS[0], max_tokens=12, temperature=0
        )
        assert out.choices[0].text == expected["raw"][WORDS[0]]
    finally:
        assert head.stop() == 0
        assert worker.proc.wait(30) == 0, worker.output()


def test_port_check_counts_a_port_in_time_wait_as_free_and_takes_ipv6():
    from pipeserve.launch_server import _check_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's listener
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = listener.accept()
            conn.close()  # the server side closes first: its end of the pair enters TIME-WAIT
            time.sleep(0.1)
    _check_port_free("127.0.0.1", port)  # uvicorn (SO_REUSEADDR) could bind it, so may we
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit, match="cannot listen on"):
            _check_port_free("127.0.0.1", taken.getsockname()[1])
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    _check_port_free("::1", free_port())
    with socket.socket() as ipv4_only:  # as uvicorn, an IPv6 listener on "::" is IPv6-only
        ipv4_only.bind(("0.0.0.0", 0))
        ipv4_only.listen()
        _check_port_free("::", ipv4_only.getsockname()[1])


def test_ranks_not_ready_in_time_is_one_clear_error_and_nothing_is_left(model_path):
    srv = Server("--model-path", model_path, "--ready-timeout", "0.2", ready=False)
    try:
        assert srv.proc.wait(60) == 1
        assert "could not start: ranks did not become ready within 0.2s" in srv.output()
        assert "Traceback" not in srv.output()
        assert srv.leftovers() == []
    finally:
        srv.stop(signal.SIGKILL)
