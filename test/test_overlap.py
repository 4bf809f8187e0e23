"""Overlap scheduling: future tokens read from the token pool, ends known one step late with the
overshoot dropped, deferred frees, an index-only descriptor; end to end at pp=1, 2 and 3 on CPU, and
waits bounded by liveness rather than by how long a live stage computes."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest
import torch

from checkpoints import hf_greedy, make_checkpoint
from pipeserve import Engine
from pipeserve.config import resolve_config
from pipeserve.frontend.ranks import RankFailure
from pipeserve.runner.kv_cache import TokenPool
from pipeserve.sampling_params import SamplingParams
from pipeserve.scheduler.descriptor import BatchDescriptor, TokenReply
from pipeserve.scheduler.req import Req
from pipeserve.scheduler.scheduler import Scheduler
from test_engine import prompts

# Seeded sampling (with penalties) of the embedded model, recorded at 2f48935, before overlap.
GOLDEN_PROMPTS = ["12+34=", "7-9=", "100+250=", "5+5=", "99-1="]
GOLDEN = [
    [30, 32, 2, 2, 23, 23, 23, 23, 28, 28],
    [23, 28, 2, 2, 2, 26, 27, 29, 2, 23],
    [29, 31, 26, 2, 2, 2, 32, 34, 28, 28],
    [27, 26, 2, 2, 2, 31, 26, 26, 28, 2],
    [35, 34, 2, 23, 27, 28, 27, 27, 2, 23],
]


def golden_params(i: int) -> dict:
    return {
        "temperature": 1.3,
        "top_k": 8,
        "top_p": 0.95,
        "max_new_tokens": 10,
        "ignore_eos": True,
        "seed": 1000 + i,
        "repetition_penalty": 1.1 if i % 2 else 1.0,
        "presence_penalty": 0.3 if i == 4 else 0.0,
    }


@pytest.mark.parametrize("pp", [1, 2])
def test_seeded_sampling_is_what_it_was_before_overlap(pp):
    with Engine(device="cpu", pp_size=pp) as engine:
        ids = [engine.tokenizer.encode(p) for p in GOLDEN_PROMPTS]
        params = [golden_params(i) for i in range(len(ids))]
        outs = engine.generate(input_ids=ids, sampling_params=params)
    assert [o["output_ids"] for o in outs] == GOLDEN


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_checkpoint(
        str(tmp_path_factory.mktemp("ov")), "llama", layers=3, heads=4, kv_heads=2
    )


@pytest.mark.parametrize("pp", [2, 3])
def test_no_token_past_a_stop_reaches_the_client(model_path, pp):
    """Requests that end on a stop token id mid-stream (known one step late on stage 0): the
    client gets exactly transformers' greedy tokens up to and including the stop."""
    batch = prompts(8, seed=41)
    ref = hf_greedy(model_path, batch, 24)
    stops = [r[5 + i % 7] for i, r in enumerate(ref)]  # a token each greedy output holds
    params = [
        {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "stop_token_ids": [s]}
        for s in stops
    ]
    with Engine(model_path=model_path, device="cpu", pp_size=pp) as engine:
        outs = engine.generate(input_ids=batch, sampling_params=params)
        engine.generate(input_ids=[batch[0]], sampling_params={"max_new_tokens": 1})  # stats after
        free, total = engine.stats["free_slots"], engine.stats["num_slots"]
    for out, want, stop in zip(outs, ref, stops, strict=True):
        assert out["output_ids"] == want[: want.index(stop) + 1]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert free == total


def test_abort_and_preemption_under_overlap_lose_nothing_and_leak_no_slot(model_path):
    batch = prompts(12, seed=42)
    params = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}
    ref = hf_greedy(model_path, batch, 30)
    with Engine(model_path=model_path, device="cpu", pp_size=2, max_total_tokens=300) as engine:
        states = engine.submit_many([(ids, params) for ids in batch])
        engine.wait(states[:1])
        engine.abort(states[3])
        engine.abort(states[7])
        engine.wait(states)
        engine.generate(input_ids=[batch[0]], sampling_params={"max_new_tokens": 1})
        stats = engine.stats
    assert stats["num_preemptions"] > 0
    assert stats["free_slots"] == stats["num_slots"]
    for i, (s, want) in enumerate(zip(states, ref, strict=True)):
        if i in (3, 7):
            assert s.finish_reason["type"] in ("abort", "length")
            assert s.output_ids == want[: len(s.output_ids)]
        else:
            assert s.output_ids == want


def test_a_slow_but_live_stage_is_not_a_dead_one(model_path, monkeypatch):
    """Stage 1's first forwards take 4 s each against a 1.5 s P2P timeout: the waits are bounded
    by heartbeats, not by compute time, so every request completes."""
    monkeypatch.setenv("PIPESERVE_DEBUG_SLOW_FORWARD", "1:4:2")
    batch = prompts(3, seed=43)
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    with Engine(model_path=model_path, device="cpu", pp_size=2, p2p_timeout_s=1.5) as engine:
        outs = engine.generate(input_ids=batch, sampling_params=params)
    assert [o["output_ids"] for o in outs] == hf_greedy(model_path, batch, 4)


def test_a_frozen_stage_is_detected_by_its_missing_heartbeat(model_path):
    with Engine(model_path=model_path, device="cpu", pp_size=2, p2p_timeout_s=2.0) as engine:
        os.kill(engine.ranks.procs[1].pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(RankFailure):
                engine.generate(
                    input_ids=prompts(2, seed=44), sampling_params={"max_new_tokens": 8}
                )
            assert time.monotonic() - start < 30
        finally:
            with contextlib.suppress(ProcessLookupError):  # the engine has killed it by now
                os.kill(engine.ranks.procs[1].pid, signal.SIGCONT)


# ---- the scheduler on its own ---------------------------------------------------------------------
def _finish(req: Req) -> dict | None:
    """Token 7 stops a request; max_new_tokens ends it."""
    if req.output_ids[-1] == 7:
        return {"type": "stop", "matched": 7}
    return {"type": "length"} if len(req.output_ids) >= req.params.max_new_tokens else None


def _scheduler(slots: int = 64, max_running: int = 8) -> Scheduler:
    cfg = resolve_config(device="cpu", max_running_requests=max_running)
    return Scheduler(cfg, slots, 128, _finish, vocab_size=100)


def _req(rid: str, n: int = 5, max_new: int = 10) -> Req:
    return Req(rid, list(range(10, 10 + n)), SamplingParams(max_new_tokens=max_new), seed=1)


def _tokens(*ids: int) -> TokenReply:
    return TokenReply(list(ids))


def test_a_request_runs_again_once_its_tokens_arrived_before_the_host_saw_them():
    s = _scheduler()
    r = _req("a")
    assert s.add(r) is None
    d1, reqs1 = s.next_microbatch(0)
    assert s.next_microbatch(1) is None  # in the pipe: its next input is not in the pool yet
    s.arrived(reqs1)
    d2, reqs2 = s.next_microbatch(1)  # a future token: launched before d1 is post-processed
    assert d2.ints("prefix_len").tolist() == [5] and d2.ints("step").tolist() == [1]
    assert not len(d2.fills) and len(d1.fills)  # the prompt entered the pools once
    s.arrived(reqs2)
    assert [t.token_id for t in s.process_result(d1, reqs1, _tokens(7))] == [7]
    assert r.finished and r.holders == 1 and r.req_pool_idx is not None  # d2 still holds it
    assert s.next_microbatch(2) is None  # ended: never scheduled again
    assert s.process_result(d2, reqs2, _tokens(9)) == []  # the overshoot token is dropped
    assert r.output_ids == [7] and r.req_pool_idx is None and s.slots.available == 64


def test_max_new_tokens_is_never_overshot():
    s = _scheduler()
    r = _req("a", max_new=2)
    s.add(r)
    launched = []
    for mb in range(4):
        built = s.next_microbatch(mb)
        if built is None:
            break
        launched.append(built)
        s.arrived(built[1])
    assert len(launched) == 2  # two samples scheduled, then nothing until they are seen


def test_decisions_are_deterministic():
    def trace() -> list:
        s = _scheduler(slots=40)
        out = []
        for i in range(6):
            s.add(_req(f"r{i}", n=3 + i, max_new=4))
        for mb in range(30):
            built = s.next_microbatch(mb)
            if built is None:
                break
            desc, reqs = built
            out.append((desc.req_ints.tolist(), desc.out_slots.tolist()))
            s.arrived(reqs)
            s.process_result(desc, reqs, _tokens(*[11] * int(desc.sampled().sum())))
        return out

    assert trace() == trace()


def test_priority_orders_admission_and_arrival_breaks_ties():
    s = _scheduler()
    for rid, prio in [("bulk1", 5), ("judge", 0), ("bulk2", 5), ("judge2", 0)]:
        r = _req(rid)
        r.priority = prio
        s.add(r)
    assert [r.rid for r in s.waiting] == ["judge", "judge2", "bulk1", "bulk2"]


def test_a_request_that_cannot_fit_the_kv_pool_is_refused_naming_the_pool():
    s = _scheduler(slots=96)
    reason = s.add(_req("big", n=5, max_new=136))
    assert "KV cache holds 96" in reason
    assert s.add(_req("ok", n=5, max_new=91)) is None


def test_unusable_sampling_values_are_refused_not_fatal():
    """Front ends bound every field; stage 0 still refuses what float32 cannot hold from any IPC
    client, rather than dying in the descriptor."""
    s = _scheduler()
    params = SamplingParams()
    object.__setattr__(params, "top_k", 10**40)  # past the front end's checks
    assert "sampling parameter" in s.add(Req("x", [1, 2], params, seed=1))


def test_descriptor_packs_for_tp_peers_and_carries_no_step_tokens():
    s = _scheduler()
    s.add(_req("a", n=4))
    desc, reqs = s.next_microbatch(0)
    again = BatchDescriptor.unpack(*desc.pack())
    for a, b in zip(desc.to_dict().values(), again.to_dict().values(), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    rows, _, ids = desc.fill_parts()
    assert rows.tolist() == [reqs[0].req_pool_idx] and ids.tolist() == [10, 11, 12, 13]
    keys = {"kind", "mb_id", "req_ints", "req_floats", "out_slots", "fills", "prefixes"}
    keys |= {"mrope", "visual"}  # image columns, empty for text
    assert set(desc.to_dict()) == keys


def test_token_pool_fill_write_read():
    pool = TokenPool(4, 16, torch.device("cpu"))
    pool.fill(np.array([1, 3]), np.array([2, 3]), np.array([5, 6, 7, 8, 9]))
    pool.write(torch.tensor([1, 3]), torch.tensor([2, 3]), torch.tensor([40, 41]))
    got = pool.read(torch.tensor([1, 1, 1, 3, 3, 3, 3]), torch.tensor([0, 1, 2, 0, 1, 2, 3]))
    assert got.tolist() == [5, 6, 40, 7, 8, 9, 41]


def test_rank_processes_carry_their_name_where_ps_shows_it():
    with Engine(device="cpu", pp_size=2) as engine:
        for rank, proc in engine.ranks.procs.items():
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                assert f.read().split(b"\0")[0] == f"pipeserve-rank{rank}".encode()
