"""A model directory without tokenizer files: refused at start with one line naming the directory
and --skip-tokenizer-init; served with that flag as token ids in, token ids out (text prompts,
chats and stop strings are 400s naming the flag). Also the EOS ids the ranks read as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from checkpoints import make_checkpoint
from pipeserve import Engine
from pipeserve.frontend.tokenizer import TokenizerNotFound
from pipeserve.model.eos import eos_token_ids
from server_harness import Server

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A Llama checkpoint with config and weights only."""
    path = make_checkpoint(str(tmp_path_factory.mktemp("bare")), "llama", layers=2, heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        os.remove(os.path.join(path, name))
    return path


@pytest.fixture(scope="module")
def expected(bare_model):
    """Greedy output ids of the offline Engine without a tokenizer."""
    with Engine(model_path=bare_model, device="cpu", cpu_threads=1, skip_tokenizer_init=True) as e:
        out = e.generate(input_ids=[[5, 6, 7], [8, 9]], sampling_params=GREEDY)
        assert all("text" not in o for o in out)
        with pytest.raises(ValueError, match=r"prompt 0 is text.*skip_tokenizer_init=True"):
            e.generate("hello", GREEDY)
        with pytest.raises(ValueError, match=r"stop strings need a tokenizer.*skip_tokenizer_init"):
            e.generate(input_ids=[5, 6], sampling_params={**GREEDY, "stop": ["a"]})
        assert e.generate(input_ids=[5, 6], sampling_params={**GREEDY, "stop_token_ids": [3]})
    return [o["output_ids"] for o in out]


def test_without_the_flag_a_directory_without_tokenizer_fails_at_once_in_one_line(bare_model):
    with pytest.raises(TokenizerNotFound) as info:
        Engine(model_path=bare_model, device="cpu")
    message = str(info.value)
    assert bare_model in message and "--skip-tokenizer-init" in message and "\n" not in message
    srv = Server("--model-path", bare_model, ready=False)
    assert srv.proc.wait(timeout=120) == 1
    output = srv.output()
    assert "Traceback" not in output and "rank" not in output, output
    lines = [line for line in output.splitlines() if "could not start" in line]
    assert len(lines) == 1 and bare_model in lines[0] and "--skip-tokenizer-init" in lines[0]


@pytest.fixture(scope="module")
def server(bare_model):
    srv = Server("--model-path", bare_model, "--skip-tokenizer-init", "--cpu-threads", "1")
    yield srv
    assert srv.stop() == 0


def post(srv: Server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.url}{route}", json=body, timeout=60)


def sse(srv: Server, route: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{srv.url}{route}", json={**body, "stream": True}, timeout=60) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_token_ids_in_token_ids_out(server, expected):
    body = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    out = post(server, "/v1/completions", {**body, "logprobs": 1}).json()
    choice = out["choices"][0]
    assert (choice["text"], choice["token_ids"]) == ("", expected[0])
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in expected[0]]
    chunks = sse(server, "/v1/completions", body)
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected[0]
    native = {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": GREEDY}
    answers = post(server, "/generate", native).json()
    assert [a["output_ids"] for a in answers] == expected
    assert all("text" not in a for a in answers)
    events = sse(server, "/generate", {"input_ids": [8, 9], "sampling_params": GREEDY})
    assert events[-1]["output_ids"] == expected[1] and "text" not in events[-1]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hello"}, None),
        ("/v1/completions", {"prompt": ["a", "b"]}, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ("/generate", {"text": "hello"}, None),
        ("/v1/completions", {"prompt": [5, 6], "stop": "x"}, "stop"),
        ("/v1/completions", {"prompt": [5, 6], "stop": "x", "stream": True}, "stop"),
        ("/generate", {"input_ids": [5, 6], "sampling_params": {"stop": ["x"]}}, "stop"),
    ],
)
def test_what_needs_a_tokenizer_is_a_400_naming_the_flag(server, expected, route, body, param):
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "--skip-tokenizer-init" in error["message"] and error["param"] == param
    assert (
        post(server, "/generate", {"input_ids": [5, 6, 7], "sampling_params": GREEDY}).json()[
            "output_ids"
        ]
        == expected[0]
    )  # and the server keeps serving


def test_eos_ids_are_read_from_json_without_a_tokenizer(tmp_path, bare_model):
    assert eos_token_ids(bare_model) == {2}  # config.json and generation_config.json
    path = make_checkpoint(str(tmp_path), "llama", layers=1, heads=2, kv_heads=2)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)

    def eos_with(**changes) -> set[int]:
        with open(config_file, "w") as f:
            json.dump({**config, **changes}, f)
        return eos_token_ids(path)

    assert eos_with(eos_token="<extra_0>") == {2, 101}  # from tokenizer.json's vocabulary
    assert eos_with(
        eos_token={"content": "<x>"}, added_tokens_decoder={"3": {"content": "<x>"}}
    ) == {
        2,
        3,
    }  # an AddedToken written out, among tokenizer_config.json's added tokens
    assert eos_with(eos_token="<not a token>") == {2}


def test_the_flag_is_parsed(bare_model):
    from pipeserve.server.args import parse_args

    assert parse_args(
        ["--model-path", bare_model, "--skip-tokenizer-init"]
    ).engine.skip_tokenizer_init
    assert not parse_args(["--model-path", bare_model]).engine.skip_tokenizer_init
    out = subprocess.run(
        [sys.executable, "-m", "pipeserve.launch_server", "--help"], capture_output=True, text=True
    )
    assert "--skip-tokenizer-init" in out.stdout
