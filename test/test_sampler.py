"""CPU unit tests of SamplingParams validation and the batched seeded sampler."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from pipeserve.runner.sampler import (
    SamplingBatch,
    apply_penalties,
    gumbel_noise,
    make_sampling_batch,
    make_token_history,
    sample,
)
from pipeserve.sampling_params import SamplingParams

# ---------------------------------------------------------------- SamplingParams


def test_from_dict_defaults() -> None:
    assert SamplingParams.from_dict(None) == SamplingParams()
    assert SamplingParams.from_dict({}) == SamplingParams()
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.n) == (128, 1.0, 1.0, -1, 1)
    assert p.stop == () and p.seed is None and p.skip_special_tokens and not p.ignore_eos
    assert not p.is_greedy and not p.has_penalties


@pytest.mark.parametrize(
    ("d", "field"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens"),
        ({"n": 0}, "n"),
        ({"top_p": "0.5"}, "top_p"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": False}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"seed": 1.0}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
    ],
)
def test_from_dict_rejects(d: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict(d)


def test_range_message_names_range() -> None:
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams.from_dict({"top_p": 1.5})


def test_unknown_key_is_named_with_accepted_list() -> None:
    with pytest.raises(ValueError, match="temprature") as info:
        SamplingParams.from_dict({"temprature": 0.5})
    assert "temperature" in str(info.value) and "max_new_tokens" in str(info.value)


def test_from_dict_conversions() -> None:
    p = SamplingParams.from_dict(
        {"stop": "END", "sampling_seed": 7, "temperature": 0, "top_k": 0, "max_new_tokens": 0}
    )
    assert p.stop == ("END",) and p.seed == 7 and p.top_k == 0 and p.max_new_tokens == 0
    assert isinstance(p.temperature, float) and p.is_greedy
    p = SamplingParams.from_dict({"stop": ["a", "b"], "stop_token_ids": [2, 3], "top_p": None})
    assert p.stop == ("a", "b") and p.stop_token_ids == (2, 3) and p.top_p == 1.0
    assert SamplingParams.from_dict({"top_k": 1}).is_greedy
    assert SamplingParams.from_dict({"presence_penalty": 0.5}).has_penalties
    with pytest.raises(ValueError, match="seed"):
        SamplingParams.from_dict({"seed": 1, "sampling_seed": 2})


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=-0.5)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- sampler helpers


def make_batch(
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    steps: list[int] | None = None,
    top_logprobs_num: list[int] | None = None,
    return_logprob: list[bool] | None = None,
    device: str = "cpu",
) -> SamplingBatch:
    b = len(params)
    return make_sampling_batch(
        params,
        seeds if seeds is not None else list(range(b)),
        steps if steps is not None else [0] * b,
        top_logprobs_num if top_logprobs_num is not None else [0] * b,
        return_logprob if return_logprob is not None else [False] * b,
        device,
    )


def random_logits(b: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def empirical_tvd(
    logits_row: torch.Tensor, params: SamplingParams, expected: torch.Tensor
) -> float:
    """Total variation distance between sampled frequencies (4000 seeds) and `expected`."""
    n = 4000
    batch = make_batch([params] * n, seeds=list(range(n)))
    tokens = sample(logits_row.expand(n, -1).contiguous(), batch).next_token_ids
    freq = torch.bincount(tokens, minlength=logits_row.numel()).float() / n
    return 0.5 * (freq - expected).abs().sum().item()


LOGITS_8 = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


# ---------------------------------------------------------------- greedy and filters


def test_greedy_paths_equal_argmax() -> None:
    logits = random_logits(6, 50)
    argmax = logits.argmax(-1)
    for params in (
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(temperature=0.7, min_p=1.0),
    ):
        out = sample(logits, make_batch([params] * 6, seeds=[11, 12, 13, 14, 15, 16]))
        assert torch.equal(out.next_token_ids, argmax), params


def test_full_distribution_matches_softmax() -> None:
    for t in (1.0, 0.5):
        expected = torch.softmax(LOGITS_8 / t, -1)
        assert empirical_tvd(LOGITS_8, SamplingParams(temperature=t), expected) < 0.05


def test_top_k_distribution() -> None:
    expected = torch.zeros(8)
    expected[:3] = torch.softmax(LOGITS_8[:3], -1)
    assert empirical_tvd(LOGITS_8, SamplingParams(top_k=3), expected) < 0.05


def test_top_p_distribution() -> None:
    probs = torch.softmax(LOGITS_8, -1)  # cumulative: 0.38, 0.61, 0.75, 0.84, ...
    expected = torch.zeros(8)
    expected[:3] = probs[:3] / probs[:3].sum()  # the smallest prefix reaching 0.7
    assert empirical_tvd(LOGITS_8, SamplingParams(top_p=0.7), expected) < 0.05


def test_min_p_distribution() -> None:
    probs = torch.softmax(LOGITS_8, -1)
    kept = probs >= 0.3 * probs.max()
    expected = torch.where(kept, probs, 0.0)
    expected /= expected.sum()
    assert int(kept.sum()) == 3
    assert empirical_tvd(LOGITS_8, SamplingParams(min_p=0.3), expected) < 0.05


# ---------------------------------------------------------------- determinism


def test_seeded_reproducible_and_no_global_rng() -> None:
    logits = random_logits(32, 1000)
    batch = make_batch([SamplingParams(temperature=0.9, top_p=0.95)] * 32, steps=[5] * 32)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = sample(logits, batch).next_token_ids
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert torch.equal(sample(logits, batch).next_token_ids, first)


def test_noise_differs_across_seeds_and_steps() -> None:
    seeds = torch.tensor([0, 1, 2**32, -1, 0, 0], dtype=torch.int64)
    steps = torch.tensor([0, 0, 0, 0, 1, 2**32 - 1], dtype=torch.int64)
    noise = gumbel_noise(seeds, steps, 64)
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.equal(noise[i], noise[j]), (i, j)
    assert torch.isfinite(noise).all()
    big = gumbel_noise(torch.arange(16), torch.zeros(16, dtype=torch.int64), 4096)
    assert abs(big.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni constant
    assert abs(big.var().item() - math.pi**2 / 6) < 0.05


def test_row_independent_of_batch_and_position() -> None:
    v, n = 300, 64
    target_logits = random_logits(1, v, seed=1)
    target = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01)
    alone = [
        sample(target_logits, make_batch([target], seeds=[s], steps=[3])).next_token_ids.item()
        for s in range(8)
    ]
    together = sample(
        target_logits.expand(n, -1).contiguous(), make_batch([target] * n, steps=[3] * n)
    ).next_token_ids
    assert together[:8].tolist() == alone
    assert len(set(together.tolist())) > 5  # different seeds, different tokens

    # interleave with neighbours of other kinds, shuffled, in a larger batch
    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=2),
        SamplingParams(temperature=1.3),
        SamplingParams(top_p=0.5, min_p=0.2),
    ]
    b = 3 * n
    positions = torch.randperm(b, generator=torch.Generator().manual_seed(0))[:n].tolist()
    params = [neighbours[i % len(neighbours)] for i in range(b)]
    seeds, steps = [1000 + i for i in range(b)], [i % 7 for i in range(b)]
    logits = random_logits(b, v, seed=2)
    for s, pos in enumerate(positions):
        params[pos], seeds[pos], steps[pos] = target, s, 3
        logits[pos] = target_logits[0]
    mixed = sample(logits, make_batch(params, seeds=seeds, steps=steps)).next_token_ids
    assert mixed[positions].tolist() == together.tolist()


# ---------------------------------------------------------------- penalties


def reference_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
) -> torch.Tensor:
    out = logits.clone()
    for b, p in enumerate(params):
        for tok in set(prompts[b]) | set(outputs[b]):
            x = out[b, tok].item()
            out[b, tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for tok in set(outputs[b]):
            count = outputs[b].count(tok)
            out[b, tok] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_reference() -> None:
    v = 40
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=-0.7),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=1.0, presence_penalty=0.3),
    ]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, v, (12,), generator=gen).tolist() for _ in params]
    outputs = [torch.randint(0, v, (9,), generator=gen).tolist() for _ in params]
    prompts[3], outputs[3] = [], []  # no penalty: no history
    logits = random_logits(len(params), v, seed=4)
    batch = make_batch(params)
    batch.history = make_token_history(prompts, outputs, "cpu")
    got = apply_penalties(logits, batch)
    torch.testing.assert_close(got, reference_penalties(logits, params, prompts, outputs))
    assert torch.equal(got[3], logits[3])  # bit-identical for a row without penalties

    greedy = [
        SamplingParams(
            temperature=0.0,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
        )
        for p in params
    ]
    batch = make_batch(greedy)
    batch.history = make_token_history(prompts, outputs, "cpu")
    assert torch.equal(sample(logits, batch).next_token_ids, got.argmax(-1))


# ---------------------------------------------------------------- logprobs


def test_logprobs_and_top_logprobs() -> None:
    logits = random_logits(4, 30, seed=5)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0)] * 2
    out = sample(
        logits, make_batch(params, top_logprobs_num=[0, 5, 2, 0], return_logprob=[True] * 4)
    )
    reference = torch.log_softmax(logits, -1)
    torch.testing.assert_close(
        out.logprobs, reference.gather(-1, out.next_token_ids[:, None])[:, 0]
    )
    assert out.top_logprobs is not None and out.top_logprob_ids is not None
    assert out.top_logprobs.shape == (4, 5)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    top = reference.topk(5, -1)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert torch.equal(out.top_logprob_ids, top.indices)

    none = sample(logits, make_batch(params))
    assert none.logprobs is None and none.top_logprobs is None and none.top_logprob_ids is None


# ---------------------------------------------------------------- CUDA parity


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    b, v = 64, 5000
    kinds = [
        SamplingParams(temperature=0.8),
        SamplingParams(top_k=20, temperature=1.2),
        SamplingParams(top_p=0.9),
        SamplingParams(min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.3),
        SamplingParams(temperature=0.0),
    ]
    params = [kinds[i % len(kinds)] for i in range(b)]
    seeds, steps = [i * 7919 - 2**40 for i in range(b)], [i % 5 for i in range(b)]
    logits = random_logits(b, v, seed=6)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, v, (20,), generator=gen).tolist() for _ in range(b)]
    outputs = [torch.randint(0, v, (6,), generator=gen).tolist() for _ in range(b)]
    results = []
    for device in ("cpu", "cuda"):
        batch = make_batch(params, seeds=seeds, steps=steps, device=device)
        batch.history = make_token_history(prompts, outputs, device)
        results.append(sample(logits.to(device), batch).next_token_ids.cpu())
    assert torch.equal(results[0], results[1])


def test_eos_is_banned_only_in_the_rows_that_have_not_reached_min_new_tokens():
    logits = torch.zeros(3, 8)
    logits[:, 2] = 10.0  # EOS (id 2) is everyone's argmax
    logits[:, 5] = 5.0
    batch = make_batch([SamplingParams(temperature=0)] * 3, return_logprob=[True] * 3)
    batch.eos_ids = torch.tensor([2, 7])
    batch.ban_eos = torch.tensor([True, False, True])
    batch.flags = dataclasses.replace(batch.flags, any_ban_eos=True)  # decided on the host
    out = sample(logits, batch)
    assert out.next_token_ids.tolist() == [5, 2, 5]
    assert out.logprobs[1] == pytest.approx(float(torch.log_softmax(logits[1], -1)[2]))
    assert logits[0, 2] == 10.0  # the caller's logits are left as they were
