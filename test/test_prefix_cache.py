"""Stage 0's prefix cache through the real engine: the same greedy tokens with the cache on and
off at pp 1-3 and pp2 x tp2 (fp32) and equal to `transformers`, prompts sharing prefixes in one
batch and across batches, a whole prompt cached, eviction under a small pool, and aborts and
preemption of requests sharing a prefix; no slot is lost."""

from __future__ import annotations

import random

import pytest

from checkpoints import hf_greedy, make_checkpoint
from pipeserve import Engine

GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("pc")), "llama", layers=4)


def shared_prefix_prompts(seed: int, groups: int = 4, per_group: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        prefix = [rng.randrange(4, 128) for _ in range(rng.randrange(8, 30))]
        out += [
            prefix + [rng.randrange(4, 128) for _ in range(rng.randrange(1, 6))]
            for _ in range(per_group)
        ]
    rng.shuffle(out)
    return out


def run(
    path: str, batches: list[list[list[int]]], sampling: dict = GREEDY, **engine: object
) -> tuple[list, dict]:
    with Engine(model_path=path, device="cpu", cpu_threads=1, **engine) as e:
        outs = [
            [o["output_ids"] for o in e.generate(input_ids=b, sampling_params=sampling)]
            for b in batches
        ]
        return outs, dict(e.stats)


@pytest.mark.parametrize(
    "layout",
    [
        dict(pp_size=1),
        dict(pp_size=2),
        dict(pp_size=3),
        dict(pp_size=2, tp_size=2),
        # the CUDA backend's kernels (Triton's interpreter on CPU) read cached prefixes too
        dict(pp_size=1, attention_backend="triton"),
    ],
    ids=["pp1", "pp2", "pp3", "pp2xtp2", "pp1-triton"],
)
def test_the_cache_changes_no_token(model_path, layout):
    first = shared_prefix_prompts(1)
    second = shared_prefix_prompts(1)[:6] + shared_prefix_prompts(2)[:6]  # cached and new
    batches = [first, second, second[:3]]  # the last: whole prompts cached but their last token
    # the interpreter's kernels are slow: fewer decode steps there (the prefixes are the point)
    new = 3 if layout.get("attention_backend") == "triton" else GREEDY["max_new_tokens"]
    sampling = {**GREEDY, "max_new_tokens": new}
    cached, stats = run(model_path, batches, sampling, **layout)
    plain, plain_stats = run(model_path, batches, sampling, disable_radix_cache=True, **layout)
    assert cached == plain
    assert cached[0] == hf_greedy(model_path, first, new)
    assert stats["num_cached_tokens"] > sum(len(p) for p in second[:6]) // 2
    assert plain_stats["num_cached_tokens"] == 0 and plain_stats["cached_slots"] == 0
    assert stats["free_slots"] == stats["num_slots"]  # every cached slot unlocked at rest


def test_eviction_under_a_small_pool_and_aborts_and_preemption_lose_nothing(model_path):
    rng = random.Random(5)
    many = [[rng.randrange(4, 128) for _ in range(rng.randrange(10, 30))] for _ in range(40)]
    shared = shared_prefix_prompts(9, groups=3, per_group=6)
    want = hf_greedy(model_path, many[:8] + shared, 10)
    with Engine(model_path=model_path, device="cpu", cpu_threads=1, max_total_tokens=200) as e:
        e.generate(input_ids=many, sampling_params=GREEDY)  # fills the cache past its pool
        states = e.submit_many([(ids, GREEDY) for ids in many[:8] + shared])
        e.poll(0.05)
        aborted = {3, 11, 17}
        for i in aborted:
            e.abort(states[i])
        e.wait(states)
        stats = dict(e.stats)
    assert stats["num_preemptions"] > 0 and stats["cached_slots"] > 0
    assert stats["free_slots"] == stats["num_slots"]
    for i, (s, ref) in enumerate(zip(states, want, strict=True)):
        if i in aborted:
            assert s.output_ids == ref[: len(s.output_ids)]
        else:
            assert s.output_ids == ref


def test_through_the_server_cached_tokens_are_reported_and_change_no_text():
    import httpx

    from server_harness import Server

    prompt = "12+34=" * 20  # the embedded model; a long shared prefix, then the same prompt
    texts = {}
    for flags in ((), ("--disable-radix-cache",)):
        srv = Server("--cpu-threads", "1", *flags)
        try:
            answers = [
                httpx.post(
                    f"{srv.url}/v1/completions",
                    json={"prompt": prompt, "max_tokens": 6, "temperature": 0},
                    timeout=60,
                ).json()
                for _ in range(2)
            ]
            metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
        finally:
            assert srv.stop() == 0
        cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
        texts[flags] = [a["choices"][0]["text"] for a in answers]
        if flags:
            assert cached == [0, 0]
        else:
            # all of the prompt but its last token, the second time
            assert cached == [0, answers[1]["usage"]["prompt_tokens"] - 1]
            hits = next(
                line
                for line in metrics.splitlines()
                if line.startswith("pipeserve_prefix_cache_hit_tokens_total ")
            )
            assert float(hits.split()[1]) == cached[1]
    assert texts[()] == texts[("--disable-radix-cache",)] and len(set(texts[()])) == 1


# ---- stage 0's scheduler alone: when prompts join the cache, and which waiting request goes first
def _scheduler(chunk: int):
    from pipeserve.config import resolve_config
    from pipeserve.scheduler.scheduler import Scheduler

    cfg = resolve_config(device="cpu", max_running_requests=8, chunked_prefill_size=chunk)

    def finish(req):
        return {"type": "length"} if len(req.output_ids) >= req.params.max_new_tokens else None

    return Scheduler(cfg, 512, 128, finish, vocab_size=200)


def _req(rid: str, ids: list[int]):
    from pipeserve.sampling_params import SamplingParams
    from pipeserve.scheduler.req import Req

    return Req(rid, ids, SamplingParams(max_new_tokens=4), seed=1)


def _step(s, mb_id: int) -> list:
    """One microbatch decided, arrived and applied (each sampled request gets token 7)."""
    from pipeserve.scheduler.descriptor import TokenReply

    desc, reqs = s.next_microbatch(mb_id)
    s.arrived(reqs)
    s.process_result(desc, reqs, TokenReply([7] * int(desc.sampled().sum())))
    return reqs


def test_a_prompt_joins_the_cache_as_its_chunks_are_scheduled():
    """A second request sharing a long prompt's prefix reuses the chunks scheduled so far, while
    the first still runs (not only after it finishes); slots are all accounted for at the end."""
    s = _scheduler(chunk=8)
    prompt = list(range(10, 30))  # 20 tokens: chunks of 8, 8, 4
    a = _req("a", prompt)
    s.add(a)
    _step(s, 0)
    _step(s, 1)
    b = _req("b", [*prompt[:18], 100, 101])
    s.add(b)
    assert _step(s, 2) == [a, b]  # a's last 4 tokens, then b with the 4 left of the budget
    assert b.prompt_cached == 16 and not a.finished
    for mb in range(3, 20):
        if not s.has_work:
            break
        _step(s, mb)
    assert a.finished and b.finished
    assert s.slots.available == s.slots.size  # every slot free or cached and unlocked


def test_waiting_requests_with_the_longest_cached_prefix_go_first_and_none_starve():
    from pipeserve.scheduler.scheduler import LPM_PATIENCE

    s = _scheduler(chunk=12)
    shared = list(range(10, 20))
    s.add(_req("warm", [*shared, 1, 2]))
    while s.has_work:
        _step(s, s.num_microbatches)
    x = _req("x", list(range(50, 62)))  # nothing cached
    ys = [_req(f"y{i}", [*shared, 60 + i, 3]) for i in range(4)]
    near = _req("near", [*shared, 1, 9])  # 11 tokens cached: the longest
    for r in [x, *ys, near]:
        s.add(r)
    assert [r.rid for r in s._admission_order()] == ["near", "y0", "y1", "y2", "y3", "x"]
    reqs = _step(s, s.num_microbatches)  # 3 + 4 x 2 uncached tokens, then x: 1 of 12
    assert [r.rid for r in reqs] == ["near", "y0", "y1", "y2", "y3", "x"]
    assert near.prompt_cached == 11 and ys[0].prompt_cached == 10 and x.prompt_cached == 0
    # a head passed over LPM_PATIENCE times goes first, whatever the others have cached
    late = _req("late", list(range(70, 82)))
    again = [_req(f"z{i}", [*shared, 80 + i, 3]) for i in range(2)]
    for r in [late, *again]:
        s.add(r)
    assert s._admission_order()[0] is again[0]
    late.passed_over = LPM_PATIENCE
    assert s._admission_order()[0] is late


def test_a_request_aborted_with_samples_in_flight_frees_every_slot():
    """Its prompt joined the cache when scheduled; it was launched again before its first token
    reached the host (the overlap loop), and aborted then: both samples are dropped, so its last
    slot has no token to key it. Freed, not lost."""
    from pipeserve.scheduler.descriptor import TokenReply

    s = _scheduler(chunk=64)
    a = _req("a", list(range(10, 30)))
    s.add(a)
    first, reqs = s.next_microbatch(0)  # the prompt; samples the first token
    s.arrived(reqs)  # its token is in the device's token pool: it may go again
    second, _ = s.next_microbatch(1)  # a decode step reading that token: a slot for it
    assert s.abort(a) is False  # held by the launched steps
    s.process_result(first, reqs, TokenReply([7]))
    s.arrived(reqs)
    s.process_result(second, reqs, TokenReply([8]))
    assert a.output_ids == [] and len(a.prompt_ids) == 20
    assert a not in s.running and s.slots.available == s.slots.size
    assert s.slots.num_cached == 20  # the prompt; the slot past it freed
