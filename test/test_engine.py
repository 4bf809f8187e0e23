"""The engine against `transformers` and its own promises, through the offline Engine (real rank
processes, ZeroMQ to stage 0)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from checkpoints import hf_greedy, make_checkpoint
from pipeserve import Engine
from pipeserve.frontend.request_state import RequestState
from pipeserve.sampling_params import SamplingParams

NEW_TOKENS = 32
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def prompts(n: int, seed: int = 0, vocab: int = 128) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


CHECKPOINTS = {
    "llama-gqa": dict(arch="llama", layers=3, heads=4, kv_heads=2, tied=False),
    "llama-tied-odd": dict(arch="llama", layers=5, heads=4, kv_heads=4, tied=True),
    "qwen2": dict(arch="qwen2", layers=3, heads=4, kv_heads=2, tied=False),
    "qwen3-tied": dict(arch="qwen3", layers=3, heads=4, kv_heads=2, tied=True, head_dim=32),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def engine_and_path(request, tmp_path_factory):
    path = make_checkpoint(
        str(tmp_path_factory.mktemp(request.param)), **CHECKPOINTS[request.param]
    )
    with Engine(model_path=path, device="cpu") as engine:
        yield engine, path


def test_greedy_matches_transformers(engine_and_path):
    engine, path = engine_and_path
    batch = prompts(16)
    got = [o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=GREEDY)]
    assert got == hf_greedy(path, batch, NEW_TOKENS)


def test_last_step_logits_match_transformers(engine_and_path):
    from transformers import AutoModelForCausalLM

    engine, path = engine_and_path
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for ids in prompts(3, seed=1):
        out = engine.generate(
            input_ids=ids,
            sampling_params={**GREEDY, "max_new_tokens": 8},
            return_logprob=True,
            top_logprobs_num=128,
        )
        full = ids + out["output_ids"][:-1]
        with torch.no_grad():
            want = torch.log_softmax(hf(torch.tensor([full])).logits[0, -1].float(), -1)
        top = out["meta_info"]["output_top_logprobs"][-1]
        got = torch.full((128,), float("nan"))
        for token, logprob in top:
            got[int(token)] = logprob
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return make_checkpoint(
        str(tmp_path_factory.mktemp("llama")), "llama", layers=4, heads=4, kv_heads=2
    )


@pytest.fixture(scope="module")
def engine(llama_path):
    with Engine(model_path=llama_path, device="cpu") as eng:
        yield eng


def test_batch_invariance(engine):
    batch = prompts(16, seed=2)
    together = [o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=GREEDY)]
    for i in (0, 7, 15):
        assert (
            engine.generate(input_ids=batch[i], sampling_params=GREEDY)["output_ids"] == together[i]
        )


def test_a_generate_batch_arrives_together_and_is_prefilled_in_one_microbatch(engine):
    engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1})
    before = engine.stats["num_microbatches"]
    engine.generate(input_ids=prompts(24, seed=5), sampling_params={"max_new_tokens": 1})
    assert engine.stats["num_microbatches"] == before + 1  # 24 short prompts fit one budget


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = {
        "temperature": 0.9,
        "top_p": 0.95,
        "top_k": 50,
        "min_p": 0.01,
        "max_new_tokens": 24,
        "ignore_eos": True,
        "seed": 1234,
    }
    target = prompts(1, seed=3)[0]
    alone = engine.generate(input_ids=target, sampling_params=params)["output_ids"]
    assert engine.generate(input_ids=target, sampling_params=params)["output_ids"] == alone
    others = prompts(9, seed=4)
    mixed = engine.generate(
        input_ids=[*others[:4], target, *others[4:]],
        sampling_params=[{**params, "seed": i} for i in range(4)]
        + [params]
        + [{**params, "seed": 99 + i} for i in range(5)],
    )
    assert mixed[4]["output_ids"] == alone
    assert (
        engine.generate(input_ids=target, sampling_params={**params, "seed": 1235})["output_ids"]
        != alone
    )


def test_stop_token_ids_stop_strings_and_max_new_tokens(engine):
    ids = prompts(1, seed=5)[0]
    free = engine.generate(input_ids=ids, sampling_params=GREEDY)
    tokens = free["output_ids"]
    k = 5
    by_id = engine.generate(
        input_ids=ids,
        sampling_params={**GREEDY, "ignore_eos": False, "stop_token_ids": [tokens[k]]},
    )
    first = tokens.index(tokens[k])
    assert by_id["output_ids"] == tokens[: first + 1]
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": tokens[k]}
    text = free["text"]
    stop = text[10:12]
    by_text = engine.generate(input_ids=ids, sampling_params={**GREEDY, "stop": [stop]})
    assert by_text["text"] == text[: text.index(stop)]
    assert by_text["meta_info"]["finish_reason"]["matched"] == stop
    short = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 3})
    assert (
        short["output_ids"] == tokens[:3]
        and short["meta_info"]["finish_reason"]["type"] == "length"
    )
    none = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 0})
    assert none["output_ids"] == [] and none["meta_info"]["completion_tokens"] == 0


def test_logprobs_of_chosen_tokens(engine):
    out = engine.generate(
        input_ids=prompts(1, seed=6)[0],
        sampling_params={**GREEDY, "max_new_tokens": 6},
        return_logprob=True,
        top_logprobs_num=3,
    )
    chosen = out["meta_info"]["output_token_logprobs"]
    tops = out["meta_info"]["output_top_logprobs"]
    assert [t for _, t in chosen] == out["output_ids"]
    for (logprob, token), top in zip(chosen, tops, strict=True):
        assert len(top) == 3 and top[0][0] == token and top[0][1] == pytest.approx(logprob)
        assert top[0][1] >= top[1][1] >= top[2][1] and logprob <= 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"temprature": 0.5}, "temprature"),
        ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ],
)
def test_bad_sampling_params_raise_value_error_naming_the_field(engine, params, field):
    with pytest.raises(ValueError, match=field):
        engine.generate(input_ids=[5, 6, 7], sampling_params=params)


def test_token_ids_outside_the_vocabulary_are_rejected_and_the_engine_lives(engine):
    for bad in ([5, 128], [-1]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.generate(input_ids=bad, sampling_params=GREEDY)
    assert (
        len(engine.generate(input_ids=[5, 6], sampling_params=GREEDY)["output_ids"]) == NEW_TOKENS
    )


def test_prompt_longer_than_context_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[5] * 600, sampling_params=GREEDY)
    assert engine.generate(input_ids=[5, 6], sampling_params={**GREEDY, "max_new_tokens": 2})[
        "output_ids"
    ]


def test_bad_prompts_are_refused_up_front_naming_the_prompt_and_the_engine_lives(engine):
    cases = [
        ([[5, 6], [5, "x"]], "prompt 1: token ids must be integers"),
        ([[5, 6], [5, 6.7]], "prompt 1: token ids must be integers"),
        ([5.0, 6], "prompt 0: token ids must be integers"),
        ([[5, True]], "prompt 0: token ids must be integers"),
        ([[5, 6], 7], "prompt 1 must be a string or a list of token ids"),
        ([[5, 6], [5] * 512], "prompt 1 has 512 tokens; the context length is 512"),
        ([[5, 6], []], "prompt 1 has no tokens"),
    ]
    for batch, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate(input_ids=batch, sampling_params=GREEDY)
    with pytest.raises(ValueError, match="request 0 has no tokens"):
        engine.submit([], {"max_new_tokens": 3})
    state = engine.submit([5, 6], {"temperature": 0, "max_new_tokens": 3})  # params as a dict
    engine.wait([state])
    assert len(state.output_ids) == 3
    # integers of other kinds are taken as the ints they are
    numpy_ids = engine.generate(input_ids=list(np.array([5, 6])), sampling_params=GREEDY)
    assert (
        numpy_ids["output_ids"]
        == engine.generate(input_ids=[5, 6], sampling_params=GREEDY)["output_ids"]
    )


def test_n_choices_offline_are_adjacent_reproducible_and_distinct(engine):
    params = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True, "seed": 7, "n": 3}
    out = engine.generate(input_ids=[[5, 6], [7, 8, 9]], sampling_params=params)
    assert len(out) == 6
    again = engine.generate(input_ids=[7, 8, 9], sampling_params=params)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in out[3:]]
    assert len({tuple(o["output_ids"]) for o in again}) == 3
    one = engine.generate(input_ids=[7, 8, 9], sampling_params={**params, "n": 1})
    assert one["output_ids"] == again[0]["output_ids"]  # choice 0 samples with the seed itself


def test_an_interrupted_wait_aborts_and_a_later_wait_sees_the_abort(engine):
    params = {"max_new_tokens": 400, "ignore_eos": True}
    states = [engine.submit([5 + i, 6], params) for i in range(4)]
    with pytest.raises(TimeoutError, match=r"unfinished after 0\.3s"):
        engine.wait(states, timeout_s=0.3)
    engine.wait(states, timeout_s=60)
    assert all(s.finish_reason["type"] == "abort" for s in states)
    assert all(len(s.output_ids) < 400 for s in states)


def test_a_stop_string_before_min_new_tokens_neither_stops_nor_cuts_the_text(engine):
    ids = prompts(1, seed=5)[0]
    free = engine.generate(input_ids=ids, sampling_params=GREEDY)
    stop = free["text"][2:4]
    first = free["text"].index(stop)
    out = engine.generate(
        input_ids=ids,
        sampling_params={**GREEDY, "stop": [stop], "min_new_tokens": NEW_TOKENS},
    )
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["text"] == free["text"] and first < len(out["text"])


def test_min_new_tokens_keeps_eos_from_being_sampled_early():
    with Engine(device="cpu", cpu_threads=1) as default:  # the embedded arithmetic model
        eos = default.tokenizer.eos_token_id
        params = {"temperature": 0, "max_new_tokens": 8}
        free = default.generate("12+34=", params)["output_ids"]
        assert eos in free[:6]  # the answer is short, then EOS
        held = default.generate("12+34=", {**params, "min_new_tokens": 8})["output_ids"]
    assert len(held) == 8 and eos not in held[:7]
    assert held[: free.index(eos)] == free[: free.index(eos)]


def test_kv_exhaustion_preempts_and_every_request_completes(llama_path):
    batch = prompts(8, seed=7)
    want = hf_greedy(llama_path, batch, NEW_TOKENS)
    with Engine(model_path=llama_path, device="cpu", max_total_tokens=120) as small:
        got = [o["output_ids"] for o in small.generate(input_ids=batch, sampling_params=GREEDY)]
        assert small.stats["num_preemptions"] > 0
        assert small.stats["free_slots"] == small.stats["num_slots"]
    assert got == want
    state = RequestState("r", SamplingParams())
    for call in (
        lambda: small.generate(input_ids=batch[0], sampling_params=GREEDY),
        lambda: small.wait([state]),
        lambda: small.poll(0.1),
        lambda: small.abort(state),
    ):
        with pytest.raises(RuntimeError, match="the engine is shut down"):
            call()


def test_tensor_parallel_equals_single_rank(tmp_path):
    # An odd vocabulary: the vocab-parallel embedding and lm_head pad it to a multiple of tp.
    path = make_checkpoint(str(tmp_path), "qwen2", layers=3, heads=4, kv_heads=2, vocab=131)
    batch = prompts(8, seed=8, vocab=131)
    want = hf_greedy(path, batch, NEW_TOKENS)
    for tp in (1, 2):
        with Engine(model_path=path, device="cpu", tp_size=tp) as engine:
            outs = engine.generate(input_ids=batch, sampling_params=GREEDY)
            assert [o["output_ids"] for o in outs] == want
