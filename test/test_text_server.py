"""Text end to end, through the real server (pp=2, so that tokens overshoot a stop string) and the
offline Engine: a checkpoint whose greedy output is a chosen text over a byte-level BPE tokenizer
that splits its characters over several tokens and applies transformers' clean-up rewrite. Every
route, streamed or not, returns `tokenizer.decode(output ids)` cut before the stop string, and the
output ids end with the token that completed it."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest

from pipeserve import Engine
from server_harness import Server
from text_models import make_text_checkpoint

# raw decode; the clean-up makes it "... then don't go. ..."
TEXT = "Hi 你好吗 ok 🙂🙂 then do n't go . 𝄞 end"
STOPS = ["你好吗", "🙂🙂", "go.", "ok", "𝄞 e"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("text"))
    tok, chain = make_text_checkpoint(path, TEXT, cleanup=True)
    return path, tok, chain


@pytest.fixture(scope="module")
def server(model):
    srv = Server("--model-path", model[0], "--pp-size", "2", "--cpu-threads", "1")
    yield srv
    assert srv.stop() == 0


def expected(model, stop: str | None, max_tokens: int = 100) -> tuple[str, list[int]]:
    """The text and output ids a greedy request must return."""
    _, tok, chain = model
    chain = chain[:max_tokens]
    for k in range(1, len(chain) + 1):
        text = tok.decode(chain[:k], skip_special_tokens=True)
        if stop is not None and stop in text:
            return text[: text.index(stop)], chain[:k]
    return tok.decode(chain, skip_special_tokens=True), chain


def openai_body(chat: bool, stop: str | None, max_tokens: int) -> dict:
    body = {"max_tokens": max_tokens, "temperature": 0, "stop": stop}
    return (
        {**body, "messages": [{"role": "user", "content": ""}]}
        if chat
        else {**body, "prompt": "<start>"}
    )


def openai(srv: Server, chat: bool, stream: bool, stop: str | None, max_tokens: int) -> tuple:
    """(text, finish_reason, completion_tokens), streamed or not."""
    url = f"{srv.url}/v1/{'chat/completions' if chat else 'completions'}"
    body = openai_body(chat, stop, max_tokens)
    if not stream:
        out = httpx.post(url, json=body, timeout=60).json()
        choice = out["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return text, choice["finish_reason"], out["usage"]["completion_tokens"]
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    texts, reasons, usage = [], [], None
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                texts.append(choice["delta"].get("content") or "" if chat else choice["text"])
                reasons.append(choice["finish_reason"])
    assert [r for r in reasons if r is not None] == [reasons[-1]]  # one finish, at the end
    return "".join(texts), reasons[-1], usage["completion_tokens"]


def native(srv: Server, stream: bool, stop: str | None, max_tokens: int) -> dict:
    params = {"max_new_tokens": max_tokens, "temperature": 0, "stop": stop}
    body = {"text": "<start>", "sampling_params": params, "stream": stream}
    if not stream:
        return httpx.post(f"{srv.url}/generate", json=body, timeout=60).json()
    events = []
    with httpx.stream("POST", f"{srv.url}/generate", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # the text so far
    return events[-1]


CASES = [(stop, 100) for stop in STOPS] + [(None, 100), (None, 5), (None, 14)]


@pytest.mark.parametrize(("stop", "max_tokens"), CASES)
def test_every_route_streamed_or_not_returns_the_decoded_text_cut_at_the_stop(
    server, model, stop, max_tokens
):
    """Stop strings of many tokens ("你好吗" takes 8, "🙂🙂" 6), one ("go.") that only the clean-up
    rewrite makes appear, none (the clean-up turns "do n't" into "don't"), and max_tokens ending
    inside a character (5, 14: the text ends in U+FFFD, streamed too)."""
    text, ids = expected(model, stop, max_tokens)
    reason = "stop" if stop is not None or len(ids) < max_tokens else "length"
    if max_tokens < 100:
        assert text.endswith("\ufffd")
    else:
        assert "don't go." in text or stop is not None
    for chat in (False, True):
        for stream in (False, True):
            got = openai(server, chat, stream, stop, max_tokens)
            assert got == (text, reason, len(ids)), (chat, stream)
    for stream in (False, True):
        out = native(server, stream, stop, max_tokens)
        assert (out["text"], out["output_ids"]) == (text, ids), stream
        finish = out["meta_info"]["finish_reason"]
        assert finish["type"] == reason and out["meta_info"]["completion_tokens"] == len(ids)
        if stop is not None:
            assert finish["matched"] == stop


def test_offline_engine_returns_the_same_text(model):
    cases = [(stop, 100) for stop in STOPS] + [(None, 100), (None, 5)]
    with Engine(model_path=model[0], device="cpu", cpu_threads=1) as engine:
        outs = engine.generate(
            ["<start>"] * len(cases),
            [{"temperature": 0, "max_new_tokens": m, "stop": s} for s, m in cases],
        )
    for (stop, max_tokens), out in zip(cases, outs, strict=True):
        text, ids = expected(model, stop, max_tokens)
        assert (out["text"], out["output_ids"]) == (text, ids), stop
        assert out["meta_info"]["completion_tokens"] == len(ids)
        if stop is not None:
            assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
