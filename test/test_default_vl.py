"""The embedded vision-language model (`--model-path default-vl`): its name resolves, its images and
prompt are the shape it was made for, and through the real server it answers the held-out images."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from pipeserve.config import (
    DEFAULT_MODEL_DIR,
    DEFAULT_VL_MODEL_DIR,
    EngineConfig,
    model_name,
    resolve_config,
)
from pipeserve.frontend.images import VisionSpec
from pipeserve.frontend.tokenizer import load_tokenizer
from pipeserve.server.args import ServerConfig

HELDOUT_FILE = Path(__file__).resolve().parents[1] / "examples/arith_vl/arith_vl_heldout.jsonl"


def heldout_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in HELDOUT_FILE.read_text().splitlines()[:n]]


def test_embedded_names_resolve_to_their_directories_and_served_names():
    for path, directory, name in (
        (None, DEFAULT_MODEL_DIR, "pipeserve-default"),
        ("default", DEFAULT_MODEL_DIR, "pipeserve-default"),
        ("default-vl", DEFAULT_VL_MODEL_DIR, "pipeserve-default-vl"),
    ):
        cfg = resolve_config(model_path=path, device="cpu")
        assert cfg.model_path == directory
        assert ServerConfig(engine=cfg).model_name == name
    assert model_name("/models/Qwen2.5-VL-3B/") == "Qwen2.5-VL-3B"
    assert EngineConfig().model_path == DEFAULT_MODEL_DIR


def test_a_problem_of_n_characters_is_n_image_tokens_in_the_text_models_prompt():
    """28 x 28n pixels are left at that size: n tokens, after which the chat template's prompt is
    the text model's, character for character."""
    spec = VisionSpec.from_dir(DEFAULT_VL_MODEL_DIR)
    assert spec is not None
    for n in range(3, 8):
        height, width = spec.resized_size(28, 28 * n)
        assert (height, width) == (28, 28 * n)
        assert spec.num_tokens((1, height // 14, width // 14)) == n
    tok = load_tokenizer(DEFAULT_VL_MODEL_DIR)
    content = [{"type": "image"}, {"type": "text", "text": ""}]
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    assert text.replace("<|image_pad|>", "12+34") == load_tokenizer(
        DEFAULT_MODEL_DIR
    ).apply_chat_template(
        [{"role": "user", "content": "12+34"}], add_generation_prompt=True, tokenize=False
    )


def test_the_server_at_pp2_answers_held_out_images():
    """lmms-eval's request (an image_url part, then an empty text part) through the launcher and
    two stages: at least 95 of the first 100 held-out problems answered exactly, each prompt the
    text model's length (bos, user, one token per character, end, assistant)."""
    from server_harness import Server

    rows = heldout_rows(100)
    server = Server("--model-path", "default-vl", "--pp-size", "2", "--cpu-threads", "1")
    try:
        models = httpx.get(server.url + "/v1/models", timeout=30).json()
        replies = [
            httpx.post(
                server.url + "/v1/chat/completions",
                json={
                    "model": "pipeserve-default-vl",
                    "messages": [{"role": "user", "content": image_message(row)}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
                timeout=120,
            ).json()
            for row in rows
        ]
    finally:
        server.stop()
    assert [m["id"] for m in models["data"]] == ["pipeserve-default-vl"]
    got = [r["choices"][0]["message"]["content"] for r in replies]
    assert sum(g == row["answer"] for g, row in zip(got, rows, strict=True)) >= 95
    assert [r["usage"]["prompt_tokens"] for r in replies] == [
        len(row["problem"]) + 4 for row in rows
    ]


def image_message(row: dict) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": row["image"]}}, {"type": "text", "text": ""}]
