"""In-process checks of the request edge: JSON with integers past Python's digit limit, the
character bound of prompts for BPE tokenizers, SamplingParams at huge values, and the offline
Engine's KV pool admission."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from checkpoints import make_checkpoint
from pipeserve import Engine
from pipeserve.sampling_params import SamplingParams, SamplingParamsError
from pipeserve.server.limits import max_prompt_chars
from pipeserve.server.openai_api import ModelInfo, encode
from pipeserve.server.protocol import ApiError, HugeInt, parse_json

CORPUS = [
    "hello world " * 50,
    "the quick brown fox jumps over the lazy dog " * 50,
    "你好吗 🙂" * 20,
]


def byte_level_bpe(normalizer: normalizers.Normalizer | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_json_integers_past_the_digit_limit_become_a_marker_no_field_accepts():
    body = parse_json(b'{"top_k": 1' + b"0" * 5000 + b', "n": -' + b"9" * 4400 + b"}")
    assert isinstance(body["top_k"], HugeInt) and repr(body["top_k"]) == "an integer of 5001 digits"
    assert repr(body["n"]) == "a negative integer of 4400 digits"
    assert parse_json(b'{"top_k": 1' + b"0" * 400 + b"}")["top_k"] == 10**400
    for bad in (b"[" * 100_000, b"\xff", b"[1]", b"{"):
        with pytest.raises(ApiError):
            parse_json(bad)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"top_k": 10**400}, "top_k"),
        ({"top_k": -(10**5000)}, "top_k"),
        ({"temperature": 10**400}, "temperature"),
        ({"repetition_penalty": -(10**400)}, "repetition_penalty"),
        ({"max_new_tokens": 2**31}, "max_new_tokens"),
        ({"min_new_tokens": 10**400}, "min_new_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"n": 17}, "n"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["x" * 1025]}, "stop"),
        ({"stop_token_ids": list(range(257))}, "stop_token_ids"),
        ({"stop_token_ids": [2**31]}, "stop_token_ids"),
        ({"temperature": 101}, "temperature"),
    ],
)
def test_sampling_params_bound_every_field_and_name_it(fields, name):
    with pytest.raises(SamplingParamsError, match=name) as info:
        SamplingParams.from_dict(fields)
    assert info.value.field == name and len(str(info.value)) < 300


def test_seeds_of_n_choices_wrap_within_int64():
    seeds = [p.seed for p in SamplingParams(seed=2**63 - 1, n=3).choices()]
    assert seeds == [2**63 - 1, -(2**63), -(2**63) + 1]


def test_prompt_character_bound_is_sound_for_byte_level_bpe():
    tok = byte_level_bpe()
    longest = max(len(t) for t in tok.get_vocab())
    bound = max_prompt_chars(tok, 50)
    assert bound == 50 * longest * 4
    rng = random.Random(0)
    for _ in range(200):  # no text has more characters per token than the bound allows
        text = "".join(rng.choice("hello wrd你好吗🙂 qu") for _ in range(rng.randrange(1, 400)))
        assert len(text) <= len(tok.encode(text)) * longest
    m = ModelInfo(tok, {"m"}, "m", len(tok), 50, 10**6, bound)
    with pytest.raises(ApiError, match="characters") as info:
        encode(m, "hello " * (bound // 6 + 1), "prompt")
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    assert len(encode(m, "hello world", "prompt")) > 0


def test_no_character_bound_where_a_token_may_cover_any_number_of_characters():
    deleting = normalizers.Sequence([normalizers.NFC(), normalizers.Strip()])
    assert max_prompt_chars(byte_level_bpe(deleting), 50) is None
    assert max_prompt_chars(byte_level_bpe(normalizers.NFKC()), 50) is not None
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    assert max_prompt_chars(PreTrainedTokenizerFast(tokenizer_object=word_level), 50) is None


def test_engine_refuses_a_request_its_kv_pool_cannot_hold(tmp_path):
    path = make_checkpoint(str(tmp_path), "llama", layers=2)
    with Engine(model_path=path, device="cpu", cpu_threads=1, max_total_tokens=64) as engine:
        greedy = {"temperature": 0, "ignore_eos": True}
        with pytest.raises(ValueError, match="KV cache pool of 64 tokens"):
            engine.generate(input_ids=[5] * 10, sampling_params={**greedy, "max_new_tokens": 55})
        with pytest.raises(ValueError, match="KV cache pool of 64 tokens"):
            engine.submit_many([([5] * 10, {**greedy, "max_new_tokens": 55})])
        out = engine.generate(input_ids=[5] * 10, sampling_params={**greedy, "max_new_tokens": 54})
        assert len(out["output_ids"]) == 54
