"""Requests with images, from the user's body to the GenerateReq on the wire: OpenAI chat content
parts, SGLang's /generate `image_data`, their limits and errors (as HTTP 400s through the real
routes); the prompt's ids equal to what transformers' processor makes of the same chat."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from checkpoints import VL_PAD
from pipeserve.config import EngineConfig
from pipeserve.frontend.client import RequestOptions
from pipeserve.frontend.detokenizer import Detokenizer
from pipeserve.frontend.image_sources import ImageError
from pipeserve.frontend.images import ImageProcessor
from pipeserve.frontend.tokenizer import load_tokenizer
from pipeserve.ipc.messages import GenerateReq
from pipeserve.ipc.sockets import IpcAddresses, SchedulerSockets
from pipeserve.server.app import build_app
from pipeserve.server.frontend import Frontend
from pipeserve.server.jobs import expand
from pipeserve.server.native import parse_generate
from pipeserve.server.openai_api import ModelInfo, parse_chat
from pipeserve.server.protocol import ApiError
from vl_checkpoint import PLACEHOLDER, make_vl_chat_checkpoint


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory):
    return make_vl_chat_checkpoint(str(tmp_path_factory.mktemp("vl")), "qwen2_5_vl")


def model_info(path: str, **limits) -> ModelInfo:
    tokenizer = load_tokenizer(path)
    images = ImageProcessor.load(EngineConfig(model_path=path, **limits), "tiny-vl", tokenizer)
    return ModelInfo(tokenizer, {"tiny-vl"}, "tiny-vl", 128, 512, 10**6, None, images)


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def image_part(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def reference(path: str, messages: list[dict], images: list[Image.Image]):
    """What transformers makes of the chat: the template's text, each image pad repeated to its
    image's token count (what Qwen-VL processors do to the text), tokenized; and the pixels."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = AutoTokenizer.from_pretrained(path)
    processed = Qwen2VLImageProcessorPil.from_pretrained(path)(images=images, return_tensors="np")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(images) + 1
    for i, grid in enumerate(processed["image_grid_thw"]):
        pieces[i] += "<|image_pad|>" * int(grid.prod() // 4)
    ids = tokenizer.encode("".join(pieces), add_special_tokens=False)
    return (
        ids,
        processed["pixel_values"],
        [tuple(int(x) for x in g) for g in processed["image_grid_thw"]],
    )


def two_image_chat() -> tuple[list[dict], list[Image.Image]]:
    images = [picture(60, 90, 1), picture(120, 40, 2)]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a: "}, image_part(images[0])]},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [image_part(images[1]), {"type": "text", "text": "b?"}],
        },
    ]
    return messages, images


def hf_messages(messages: list[dict]) -> list[dict]:
    """The same chat as a transformers processor takes it: image parts as {'type': 'image'}."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [p if p["type"] == "text" else {"type": "image"} for p in content]
        out.append({**m, "content": content})
    return out


def test_a_chat_with_images_is_the_processors_prompt(vl_path):
    messages, images = two_image_chat()
    job = parse_chat({"messages": messages, "max_tokens": 4}, model_info(vl_path))
    want_ids, want_pixels, want_grids = reference(vl_path, hf_messages(messages), images)
    assert job.prompts == [want_ids]
    got = job.images[0]
    assert [im.grid for im in got] == want_grids
    pixels = np.concatenate([np.frombuffer(im.pixels, np.float32) for im in got])
    np.testing.assert_array_equal(pixels.reshape(want_pixels.shape), want_pixels)
    assert want_ids.count(VL_PAD) == sum(g[1] * g[2] // 4 for g in want_grids)


def test_the_request_message_carries_the_images_and_their_tokens(vl_path):
    """Through the server's bridge to stage 0: what stage 0 receives."""
    messages, _ = two_image_chat()
    m = model_info(vl_path)
    job = parse_chat({"messages": messages, "max_tokens": 4, "n": 2}, m)
    received = asyncio.run(_submit_and_receive(job, m))
    assert len(received) == 2  # n = 2: one request per choice, the same images
    for req in received:
        assert isinstance(req, GenerateReq)
        assert req.input_ids == job.prompts[0]
        assert [im.digest for im in req.images] == [im.digest for im in job.images[0]]


async def _submit_and_receive(job, m: ModelInfo) -> list:
    ipc = IpcAddresses.fresh()
    frontend = Frontend(_LiveRanks(), ipc, None, Detokenizer(m.tokenizer))
    stage0 = SchedulerSockets(ipc)
    try:
        with frontend.admitted(job.num_requests) as run:
            await frontend.submit(run, expand(job), RequestOptions())
            msgs = await asyncio.to_thread(stage0.recv_all, 5.0)
        return [r for msg in msgs for r in getattr(msg, "reqs", [msg])]
    finally:
        await frontend.shutdown(stop_ranks=False)
        stage0.pull.close(0)
        for push in stage0.push:
            push.close(0)
        ipc.cleanup()


class _LiveRanks:
    def check_alive(self) -> None:
        pass

    def sentinels(self) -> list[int]:
        return []


def test_usage_counts_the_image_tokens(vl_path):
    from pipeserve.server.openai_api import _usage

    messages, _ = two_image_chat()
    job = parse_chat({"messages": messages}, model_info(vl_path))
    image_tokens = sum(im.grid[1] * im.grid[2] // 4 for im in job.images[0])
    assert job.prompts[0].count(VL_PAD) == image_tokens > 0
    assert _usage([], job.prompts)["prompt_tokens"] == len(job.prompts[0])


def test_a_text_model_refuses_image_parts():
    from pipeserve.frontend.tokenizer import load_tokenizer as load

    tokenizer = load(EngineConfig.model_path)
    m = ModelInfo(tokenizer, {"tiny"}, "tiny", 105, 256)
    body = {"messages": [{"role": "user", "content": [image_part(picture(8, 8, 0))]}]}
    with pytest.raises(ApiError, match="model tiny does not accept images") as e:
        parse_chat(body, m)
    assert e.value.param == "messages[0].content[0]"
    text_parts = [{"type": "text", "text": "1+1"}, {"type": "text", "text": "="}]
    job = parse_chat({"messages": [{"role": "user", "content": text_parts}]}, m)
    assert tokenizer.decode(job.prompts[0]).count("1+1\n=") == 1  # text parts joined as before
    with pytest.raises(ImageError, match="model tiny does not accept images"):
        parse_generate({"text": "x", "image_data": data_url(picture(8, 8, 0))}, m)


def test_generate_takes_sglangs_image_data(vl_path):
    m = model_info(vl_path)
    a, b = picture(60, 90, 1), picture(30, 30, 2)
    text = f"look {PLACEHOLDER} and {PLACEHOLDER}!"
    job, batch = parse_generate({"text": text, "image_data": [data_url(a), data_url(b)]}, m)
    assert not batch and [im.grid for im in job.images[0]] == [(1, 4, 6), (1, 4, 4)]
    assert job.prompts[0].count(VL_PAD) == 6 + 4
    ids = m.tokenizer.encode(text)
    same, _ = parse_generate({"input_ids": ids, "image_data": [data_url(a), data_url(b)]}, m)
    assert same.prompts == job.prompts
    texts = [f"{PLACEHOLDER}1", "no image", f"{PLACEHOLDER}2"]
    batch_job, batch = parse_generate(
        {"text": texts, "image_data": [data_url(a), None, [data_url(b)]]}, m
    )
    assert batch and [len(ims) for ims in batch_job.images] == [1, 0, 1]
    with pytest.raises(ImageError, match="'text' holds 1 image placeholder\\(s\\) for 2"):
        parse_generate({"text": f"{PLACEHOLDER}", "image_data": [data_url(a)] * 2}, m)
    with pytest.raises(ImageError, match="one entry per prompt"):
        parse_generate({"text": texts, "image_data": [data_url(a)]}, m)


# ---- through the HTTP routes --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(vl_path):
    from fastapi.testclient import TestClient

    m = model_info(vl_path, max_images_per_request=2, max_image_pixels=200 * 200)
    ipc = IpcAddresses.fresh()
    frontend = Frontend(_LiveRanks(), ipc, None, Detokenizer(m.tokenizer))
    app = build_app(frontend, m, lambda: frontend.shutdown(stop_ranks=False))
    with TestClient(app) as c:
        yield c
    ipc.cleanup()


def chat_body(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]}


@pytest.mark.parametrize(
    "parts, status, match, param",
    [
        (
            [
                image_part(picture(9, 9, 0)),
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
            400,
            "messages[0].content[2] is not a decodable image",
            "messages[0].content[2]",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
            400,
            "--allow-image-fetch",
            "messages[0].content[1]",
        ),
        (
            [image_part(picture(9, 9, 0))] * 3,
            400,
            "3 images; the limit is 2 per request (--max-images-per-request)",
            "messages[0].content[3]",
        ),
        (
            [image_part(picture(300, 200, 0))],
            400,
            "300 = 60000 pixels; the limit is 40000 pixels per image (--max-image-pixels)",
            "messages[0].content[1]",
        ),
        (
            [{"type": "image_url", "image_url": {}}],
            400,
            "must be an object with a non-empty 'url'",
            "messages[0].content[1]",
        ),
        ([{"type": "audio", "audio": "x"}], 400, "only text and image_url parts", None),
    ],
    ids=["broken", "http", "count", "pixels", "no-url", "audio"],
)
def test_bad_images_are_400s_naming_the_image(client, parts, status, match, param):
    r = client.post("/v1/chat/completions", json=chat_body(*parts))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert match in error["message"]
    if param is not None:
        assert error["param"] == param
    assert client.get("/health").status_code == 200  # and the server keeps serving


def test_generate_with_a_missing_placeholder_is_a_400(client):
    body = {"text": "no placeholder", "image_data": data_url(picture(20, 20, 0))}
    r = client.post("/generate", json=body)
    assert r.status_code == 400
    assert PLACEHOLDER in r.json()["error"]["message"]


# ---- the offline Engine, through a served tiny model -------------------------------------------------
def test_engine_generate_with_image_data_equals_transformers(vl_path):
    """Engine.generate(prompt, image_data=...) against transformers' greedy tokens for the same
    prompt and the same processor's pixels (the rank side serves the tiny random checkpoint)."""
    import torch
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from checkpoints import hf_vl_greedy
    from pipeserve import Engine

    images = [picture(60, 90, 1), picture(40, 120, 2)]
    text = f"a{PLACEHOLDER}b{PLACEHOLDER}c"
    processed = Qwen2VLImageProcessorPil.from_pretrained(vl_path)(
        images=images, return_tensors="np"
    )
    grids = [tuple(int(x) for x in g) for g in processed["image_grid_thw"]]
    expanded = text
    for g in grids:  # the processor's own expansion of the text: each pad to its token count
        expanded = expanded.replace("<|image_pad|>", "<|placeholder|>" * (g[1] * g[2] // 4), 1)
    expanded = expanded.replace("<|placeholder|>", "<|image_pad|>")
    ids = AutoTokenizer.from_pretrained(vl_path).encode(expanded)
    pixels = torch.from_numpy(processed["pixel_values"])
    want = hf_vl_greedy(vl_path, [(ids, pixels, grids)], 4)[0]
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    with Engine(model_path=vl_path, device="cpu", cpu_threads=1) as engine:
        out = engine.generate(text, params, image_data=[images[0], data_url(images[1])])
        with pytest.raises(ValueError, match="'prompt' holds 2 image placeholder"):
            engine.generate(text, params, image_data=images[0])
    assert out["output_ids"] == want
    assert out["meta_info"]["prompt_tokens"] == len(ids)


# ---- the real server, pp=2 ---------------------------------------------------------------------------
def test_the_server_at_pp2_answers_a_chat_with_images_as_the_engine_does(vl_path):
    """Through HTTP (the launcher, its front end, two stages): a chat with two images, streamed and
    not, gives the offline engine's greedy text for the same prompt and images; a broken image is
    a 400 and the server keeps serving."""
    from pipeserve import Engine
    from server_harness import Server

    messages, images = two_image_chat()
    body = {"messages": messages, "max_tokens": 6, "temperature": 0}
    server = Server("--model-path", vl_path, "--pp-size", "2", "--cpu-threads", "1")
    try:
        url = server.url + "/v1/chat/completions"
        plain = httpx.post(url, json=body, timeout=120).json()
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        bad = {**body, "messages": [{"role": "user", "content": [image_part(images[0])]}]}
        bad["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,AAAA"
        refused = httpx.post(url, json=bad, timeout=60)
        again = httpx.post(url, json=body, timeout=120).json()
    finally:
        server.stop()
    text = plain["choices"][0]["message"]["content"]
    streamed = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
    )
    assert streamed == text == again["choices"][0]["message"]["content"]
    assert plain["usage"]["completion_tokens"] == 6
    assert refused.status_code == 400 and "image" in refused.json()["error"]["message"]
    job = parse_chat({"messages": messages, "max_tokens": 6}, model_info(vl_path))
    with Engine(model_path=vl_path, device="cpu", cpu_threads=1) as engine:
        params = {"temperature": 0, "max_new_tokens": 6}
        state = engine.submit(job.prompts[0], params, images=job.images_of(0))
        engine.wait([state])
        want = engine.result(state)
    assert plain["usage"]["prompt_tokens"] == want["meta_info"]["prompt_tokens"]
    assert text == want["text"]


def test_a_body_naming_an_image_is_parsed_off_the_event_loop():
    """Short text bodies are parsed on the event loop (a thread's hand-off costs more), but one
    that names an image never is: reading, fetching or decoding it must not stall the others."""
    from starlette.requests import Request

    from pipeserve.server.app import serve_request

    def on_loop_thread(body: bytes) -> bool:
        seen: list[bool] = []
        loop_thread = []

        def parse(parsed: dict) -> None:
            seen.append(threading.get_ident() == loop_thread[0])
            raise ApiError("parsed")  # answered as a 400: nothing is submitted

        async def go() -> int:
            loop_thread.append(threading.get_ident())
            sent = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict:
                return sent.pop() if sent else {"type": "http.disconnect"}

            ipc = IpcAddresses.fresh()
            try:
                frontend = Frontend(_LiveRanks(), ipc, None)
                request = Request({"type": "http", "method": "POST", "headers": []}, receive)
                response = await serve_request(frontend, 1 << 20, request, parse, None, None)
                await frontend.shutdown(stop_ranks=False)
            finally:
                ipc.cleanup()
            return response.status_code

        assert asyncio.run(go()) == 400
        return seen[0]

    text = json.dumps({"prompt": "hello"}).encode()
    assert on_loop_thread(text)
    assert not on_loop_thread(json.dumps(chat_body(image_part(picture(9, 9, 0)))).encode())
    assert not on_loop_thread(json.dumps({"text": "x", "image_data": "file:///a.png"}).encode())
    assert not on_loop_thread(json.dumps({"prompt": "x" * 5000}).encode())  # a long one
