"""CUDA paths: skipped without CUDA (and the NCCL ones without two or four GPUs).

On one GPU: device tensors in the tensor-dict planning (never inline, record_stream on send) through
a one-rank world, and the engine on CUDA against transformers. With two GPUs: NCCL round trips of
every dtype, a received buffer read on a separate consumer stream, PP parity. With four: pp=2 x tp=2.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import hf_greedy, make_checkpoint
from dist_harness import run_ranks
from pipeserve.distributed import Channel, get_pp_group, get_tp_group
from test_p2p import assert_bit_exact

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL refuses two ranks on one GPU)"
)
four_gpus = pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs four GPUs")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool]


def device_dict(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = {
        str(dt).removeprefix("torch."): (torch.randn(33, 7, generator=g) * 100).to(dt).cuda()
        for dt in DTYPES
    }
    d["empty"] = torch.empty(0, 5, device="cuda")
    d["scalar"] = torch.tensor(2.5, device="cuda")
    d["strided"] = torch.randn(8, 6, generator=g).cuda()[::2, 1::2]
    d["cpu_meta"] = torch.arange(5)  # CPU tensors still travel on gloo
    d["note"] = "mixed"
    return d


@cuda
def test_device_tensors_are_planned_out_of_line_with_record_stream(monkeypatch):
    from dist_harness import free_port
    from pipeserve.distributed import DistConfig, destroy_distributed, init_distributed

    init_distributed(
        DistConfig(pp_size=1, init_method=f"tcp://127.0.0.1:{free_port()}", device="cuda")
    )
    try:
        pp = get_pp_group()
        plan = pp.plan_send(device_dict(0), None, None)
        inline_keys = {e.key for e in plan.entries if e.inline}
        assert inline_keys == {"cpu_meta"}  # device tensors never ride inline
        assert all(t.is_cuda for _, t in plan.out_of_line)
        recorded, posted = [], []

        class FakeGroup:  # stands in for the NCCL group: one GPU cannot host a peer
            def send(self, tensors: list, dst: int, tag: int) -> None:
                posted.append(tensors[0])

        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: recorded.append(s))
        pp.device_groups = {Channel.PROXY: FakeGroup()}
        for key, t in plan.out_of_line:
            pp.post_send(t, 0, Channel.PROXY, Channel.PROXY.data_tag, key, cpu=False)
        assert recorded == [torch.cuda.current_stream()] * len(plan.out_of_line)
        assert len(posted) == len(plan.out_of_line)
    finally:
        destroy_distributed()


def _nccl_round_trip(rank: int) -> bool:
    pp = get_pp_group()
    if rank == 0:
        for seed in range(3):
            pp.send_tensor_dict(device_dict(seed))
        return True
    for seed in range(3):
        got = pp.recv_tensor_dict()
        assert all(
            v.is_cuda for k, v in got.items() if isinstance(v, torch.Tensor) and k != "cpu_meta"
        )
        assert_bit_exact(
            {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in got.items()},
            {
                k: v.cpu() if isinstance(v, torch.Tensor) else v
                for k, v in device_dict(seed).items()
            },
        )
    return True


@two_gpus
def test_nccl_round_trip_every_dtype():
    assert run_ranks(_nccl_round_trip, device="cuda") == {0: True, 1: True}


def _consumer_stream(rank: int) -> float:
    """A received buffer read on a side stream: with record_stream for that stream, the allocator
    cannot hand its memory to the next receive while the side stream still reads it."""
    pp = get_pp_group()
    n = 1 << 22
    if rank == 0:
        for i in range(8):
            pp.send_tensor_dict({"x": torch.full((n,), float(i), device="cuda")})
        return 0.0
    side = torch.cuda.Stream()
    sums = []
    for _ in range(8):
        d = pp.recv_tensor_dict()
        x = d["x"]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)  # keep the side stream busy well past the next receive
            sums.append(x.sum())
        x.record_stream(side)
        del d, x
    torch.cuda.synchronize()
    return sum(float(s) for s in sums)


@two_gpus
def test_received_buffer_on_a_consumer_stream_is_not_reused():
    res = run_ranks(_consumer_stream, device="cuda", timeout=120)
    assert res[1] == sum(float(i) * (1 << 22) for i in range(8))


def _tp_split_cuda(rank: int) -> bool:
    pp, tp = get_pp_group(), get_tp_group()
    x = torch.arange(64 * 32, dtype=torch.float32, device="cuda").view(64, 32)
    if pp.is_first_rank:
        pp.send_tensor_dict({"hidden_states": x, "odd": x[:3, :5]}, all_gather_group=tp)
        return True
    d = pp.recv_tensor_dict(all_gather_group=tp)
    assert torch.equal(d["hidden_states"], x) and torch.equal(d["odd"], x[:3, :5])
    return pp.stats.total_received(Channel.PROXY) == (64 * 32 * 4) // 2 + 15 * 4


@four_gpus
def test_tp_split_over_nccl_pp2_tp2():
    assert all(run_ranks(_tp_split_cuda, pp=2, tp=2, device="cuda").values())


@pytest.fixture(scope="module")
def cuda_model(tmp_path_factory):
    return make_checkpoint(
        str(tmp_path_factory.mktemp("cuda")), "llama", layers=4, heads=4, kv_heads=2
    )


@cuda
def test_engine_on_cuda_matches_transformers(cuda_model):
    from pipeserve import Engine
    from test_engine import GREEDY, prompts

    batch = prompts(8, seed=21)
    with Engine(model_path=cuda_model, device="cuda", dtype="float32") as engine:
        got = [o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=GREEDY)]
    assert got == hf_greedy(cuda_model, batch, 32)


@two_gpus
def test_pp2_on_cuda_equals_pp1(cuda_model):
    from pipeserve import Engine
    from test_engine import GREEDY, prompts

    batch = prompts(12, seed=22)
    outs = {}
    for pp in (1, 2):
        with Engine(model_path=cuda_model, device="cuda", dtype="float32", pp_size=pp) as engine:
            outs[pp] = [
                o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=GREEDY)
            ]
    assert outs[1] == outs[2]
