"""Deterministic mode (`--deterministic`): a request's output ids and logprobs are bitwise the same
whether it runs alone or among random other requests, at pp 1-3, with any prefill chunk size, its
prompt cached or not; in bf16 and fp32. The kernels' premise (a row's result does not depend on
the rows beside it) is checked on this machine first, and default mode is shown to break it, so
that these tests would catch a regression."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from checkpoints import make_checkpoint
from invariance import probe_runs
from pipeserve import Engine
from pipeserve.model import batch_invariant

DTYPES = [torch.float32, torch.bfloat16]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- kernels --------------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_projection_rows_do_not_depend_on_their_batch(dtype, threads):
    with torch_threads(threads):
        gen = torch.Generator().manual_seed(0)
        for n, k, bias in (
            (192, 64, False),
            (640, 320, True),
            (320, 1280, False),
            (4000, 96, False),
        ):
            w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype) if bias else None
            x = torch.randn(300, k, generator=gen).to(dtype)
            alone = torch.cat([batch_invariant.linear(x[i : i + 1], w, b) for i in range(300)])
            for m in (2, 3, 4, 5, 7, 8, 9, 16, 33, 64, 100, 300):
                assert torch.equal(batch_invariant.linear(x[:m], w, b), alone[:m]), (n, k, m)
            gate_up = torch.randn(300, 2 * k, generator=gen).to(dtype) * 4
            one = torch.cat([batch_invariant.silu_mul(gate_up[i : i + 1], k) for i in range(50)])
            for m in (50, 77, 300):
                assert torch.equal(batch_invariant.silu_mul(gate_up[:m], k)[:50], one)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(8, 2), (4, 2), (3, 3)], ids=["gqa4", "gqa2", "mha"])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_is_the_same_in_any_batch_and_chunking(dtype, heads, threads):
    """One request's attention computed whole, in random chunks, a token at a time, and among
    random decodes and extends of others: bitwise equal."""
    with torch_threads(threads):
        runs = probe_runs("torch_invariant", dtype, heads, 200, np.random.default_rng(1))
    whole, *others = runs
    for run in others:
        assert torch.equal(run, whole)


def test_default_attention_is_not_batch_invariant():
    """The check above has teeth: SDPA's reductions move with the batch (bf16)."""
    whole, *others = probe_runs("torch", torch.bfloat16, (8, 2), 200, np.random.default_rng(1))
    assert not all(torch.equal(run, whole) for run in others)


def test_the_flag_reaches_the_config_and_the_backends():
    from pipeserve.model.attention import resolve_backend_name
    from pipeserve.server.args import parse_args

    assert parse_args(["--device", "cpu", "--deterministic"]).engine.deterministic
    assert not parse_args(["--device", "cpu"]).engine.deterministic
    assert resolve_backend_name("auto", "cpu", deterministic=True) == "torch_invariant"
    assert resolve_backend_name("auto", "cuda", deterministic=True) == "triton_invariant"
    assert resolve_backend_name("torch", "cuda", deterministic=False) == "torch"
    with pytest.raises(ValueError, match="needs the triton attention backend"):
        resolve_backend_name("torch", "cuda", deterministic=True)


# ---- the engine -----------------------------------------------------------------------------------
PROBE_PARAMS = [
    {"temperature": 0, "ignore_eos": True, "max_new_tokens": 14},
    {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 11, "max_new_tokens": 14},
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("det"))
    return make_checkpoint(
        path, "llama", layers=4, hidden=128, heads=4, kv_heads=2, intermediate=256
    )


def probes() -> list[tuple[list[int], dict]]:
    """Prompts of 1 to 150 tokens (across the attention's 64-key chunks and 128-token query
    blocks), greedy and seeded sampling."""
    rng = random.Random(5)
    lengths = [1, 9, 55, 64, 100, 150]
    return [
        ([rng.randrange(3, 128) for _ in range(n)], PROBE_PARAMS[i % 2])
        for i, n in enumerate(lengths)
    ]


def outcome(result: dict) -> tuple:
    meta = result["meta_info"]
    return result["output_ids"], meta["output_token_logprobs"], meta["output_top_logprobs"]


def solo_runs(engine: Engine, items: list[tuple[list[int], dict]]) -> list[tuple]:
    return [
        outcome(
            engine.generate(
                input_ids=ids, sampling_params=p, return_logprob=True, top_logprobs_num=3
            )
        )
        for ids, p in items
    ]


def mixed_runs(engine: Engine, items: list, rng: random.Random, size: int) -> list[tuple]:
    """`items` spread over one batch of `size` requests with random others: short and long
    prompts, some sharing a probe's prefix, greedy and sampled, 1-20 new tokens."""
    others = []
    for _ in range(max(0, size - len(items))):
        ids = [rng.randrange(3, 128) for _ in range(rng.randrange(1, 80))]
        if rng.random() < 0.3:
            ids = rng.choice(items)[0][: rng.randrange(1, 40)] + ids[:10]
        params = {"max_new_tokens": rng.randrange(1, 21), "ignore_eos": True, "temperature": 0}
        if rng.random() < 0.5:
            params.update(temperature=1.0, seed=rng.randrange(1 << 20))
        others.append((ids, params))
    places = sorted(rng.sample(range(len(others) + len(items)), len(items)))
    batch = list(others)
    for place, item in zip(places, items, strict=True):  # ascending: each lands at its place
        batch.insert(place, item)
    results = engine.generate(
        input_ids=[ids for ids, _ in batch],
        sampling_params=[p for _, p in batch],
        return_logprob=True,
        top_logprobs_num=3,
    )
    return [outcome(results[i]) for i in places]


def engine(path: str, dtype: torch.dtype, device: str = "cpu", **kwargs) -> Engine:
    threads = {"cpu_threads": 1} if device == "cpu" else {}
    dtype_name = str(dtype).removeprefix("torch.")
    return Engine(model_path=path, device=device, dtype=dtype_name, **threads, **kwargs)


@pytest.fixture(scope="module", params=DTYPES, ids=["fp32", "bf16"])
def reference(request, model_path):
    """Each probe alone, pp=1, no cache, unchunked."""
    dtype = request.param
    with engine(model_path, dtype, deterministic=True, disable_radix_cache=True) as e:
        return dtype, solo_runs(e, probes())


LAYOUTS = [
    dict(pp_size=1),
    dict(pp_size=2, chunked_prefill_size=16),
    dict(pp_size=3, chunked_prefill_size=37, disable_radix_cache=True),
    dict(pp_size=3, chunked_prefill_size=200, pp_async_batch_depth=1),
]


@pytest.mark.parametrize(
    "layout", LAYOUTS, ids=["pp1", "pp2-chunk16", "pp3-chunk37-nocache", "pp3-chunk200-async"]
)
def test_a_request_gives_the_same_tokens_and_logprobs_however_it_is_served(
    model_path, reference, layout
):
    dtype, expected = reference
    rng = random.Random(str(layout))
    items = probes()
    with engine(model_path, dtype, deterministic=True, **layout) as e:
        got = {"solo": solo_runs(e, items)}
        for size in (1, 8, 64, 256):  # after the first, the probes' prompts are mostly cached
            got[f"batch of {size}"] = mixed_runs(e, items, rng, size)
        cached = e.stats["num_cached_tokens"]
    for way, outcomes in got.items():
        for i, (want, have) in enumerate(zip(expected, outcomes, strict=True)):
            assert have == want, f"probe {i} ({len(items[i][0])} tokens), {way}, {layout}"
    assert cached > 0 or layout.get("disable_radix_cache")


def test_default_mode_is_not_batch_invariant_in_bf16(model_path):
    """Without --deterministic a probe's logprobs move with its batch (so the test above would
    catch a kernel that lost its invariance)."""
    items = probes()
    with engine(model_path, torch.bfloat16, disable_radix_cache=True) as e:
        alone = solo_runs(e, items)
        mixed = mixed_runs(e, items, random.Random(3), 64)
    assert alone != mixed


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_cuda_outputs_are_the_same_alone_batched_chunked_and_with_graphs_on_or_off(tmp_path, dtype):
    """The Triton path: the batch-invariant matmul and attention kernels, CUDA graphs replaying
    decode batches padded to their bucket; pp=2 where two GPUs are visible."""
    path = make_checkpoint(
        str(tmp_path), "llama", layers=4, hidden=1024, heads=16, kv_heads=4, intermediate=4096
    )
    items = probes()
    plain = dict(disable_cuda_graph=True, disable_radix_cache=True)
    with engine(path, dtype, "cuda", deterministic=True, **plain) as e:
        expected = solo_runs(e, items)
    layouts = [{}, dict(chunked_prefill_size=16), dict(disable_cuda_graph=True)]
    if torch.cuda.device_count() >= 2:
        layouts.append(dict(pp_size=2, chunked_prefill_size=37))
    rng = random.Random(9)
    for layout in layouts:
        with engine(path, dtype, "cuda", deterministic=True, **layout) as e:
            got = {"solo": solo_runs(e, items)}
            for size in (8, 64, 256):
                got[f"batch of {size}"] = mixed_runs(e, items, rng, size)
        for way, outcomes in got.items():
            for i, (want, have) in enumerate(zip(expected, outcomes, strict=True)):
                assert have == want, f"probe {i}, {way}, {layout}"
