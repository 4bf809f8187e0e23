"""The CUDA execution path: Triton kernels compiled for the device, CUDA graphs against eager and
`transformers` in float32, pad rows, and (two GPUs) pp=2 and tp=2 with graphs. Skipped without CUDA;
docs/benchmarks.md holds the output of a run on an H200."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import hf_greedy, make_checkpoint
from test_engine import CHECKPOINTS, GREEDY, prompts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

SAMPLED = {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "max_new_tokens": 24, "seed": 5}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def arch_path(request, tmp_path_factory):
    return make_checkpoint(
        str(tmp_path_factory.mktemp(f"g-{request.param}")), **CHECKPOINTS[request.param]
    )


def _run(path: str, items: list, **cfg) -> list:
    """Half the requests, then the rest while those decode (mixed prefill + decode microbatches),
    with a small prefill chunk; returns output ids and logprobs per request."""
    from pipeserve import Engine
    from pipeserve.sampling_params import SamplingParams

    cfg = {"device": "cuda", "dtype": "float32", "chunked_prefill_size": 48, **cfg}
    with Engine(model_path=path, **cfg) as engine:
        half = len(items) // 2
        first = [engine.submit(i, SamplingParams.from_dict(p), True, 2) for i, p in items[:half]]
        engine.wait(first[:1])
        rest = [engine.submit(i, SamplingParams.from_dict(p), True, 2) for i, p in items[half:]]
        engine.wait(first + rest)
        engine.generate(input_ids=[items[0][0]], sampling_params={"max_new_tokens": 1})
        free, total = engine.stats["free_slots"], engine.stats["num_slots"]
        assert free == total  # nothing leaked
        return [(s.output_ids, s.logprobs) for s in first + rest]


@cuda
def test_graphs_equal_eager_and_transformers(arch_path):
    batch = prompts(10, seed=31)
    items = [(ids, GREEDY) for ids in batch] + [(ids, SAMPLED) for ids in batch[:4]]
    graphs = _run(arch_path, items)
    eager = _run(arch_path, items, disable_cuda_graph=True)
    torch_backend = _run(arch_path, items, attention_backend="torch")
    assert [o for o, _ in graphs] == [o for o, _ in eager] == [o for o, _ in torch_backend]
    for (_, a), (_, b) in zip(graphs, eager, strict=True):
        assert np.allclose(a, b, atol=1e-4)
    assert [o for o, _ in graphs[:10]] == hf_greedy(arch_path, batch, GREEDY["max_new_tokens"])


@cuda
def test_graphs_under_preemption_and_abort(tmp_path):
    path = make_checkpoint(str(tmp_path), "llama", layers=3, heads=4, kv_heads=2)
    batch = prompts(12, seed=32)
    items = [(ids, GREEDY) for ids in batch]
    tight = _run(path, items, max_total_tokens=260)  # preempts: 12 requests of up to 72 tokens
    assert [o for o, _ in tight] == hf_greedy(path, batch, GREEDY["max_new_tokens"])


def _runner(path: str, max_bs: int = 8):
    from pipeserve.config import resolve_config
    from pipeserve.distributed import DistConfig, get_tp_group, init_distributed
    from pipeserve.model.config import ModelConfig
    from pipeserve.model.parallel import ParallelContext
    from pipeserve.runner.model_runner import ModelRunner
    from pipeserve.utils import free_port

    init_distributed(
        DistConfig(pp_size=1, init_method=f"tcp://127.0.0.1:{free_port()}", device="cuda")
    )
    cfg = resolve_config(
        model_path=path, device="cuda", dtype="float32", max_running_requests=max_bs
    )
    ctx = ParallelContext(tp_group=get_tp_group())
    runner = ModelRunner(cfg, ModelConfig.from_dir(path), ctx, torch.device("cuda", 0))
    runner.allocate_kv(64)
    runner.capture_graphs()
    return runner


@cuda
def test_padded_graph_rows_touch_only_the_pad_slot(tmp_path):
    from pipeserve.distributed import destroy_distributed
    from pipeserve.scheduler.descriptor import REQ_FLOAT_COLUMNS, REQ_INT_COLUMNS, BatchDescriptor

    runner = _runner(make_checkpoint(str(tmp_path), "llama", layers=2, heads=4, kv_heads=2))
    try:
        k0 = runner.kv.layers[0][0]
        k0.normal_()
        runner.table.slots.random_(1, 60)
        before_k, before_table = k0.clone(), runner.table.slots.clone()
        # three decodes (bucket 4): rows 0, 2, 5 at positions 3, 4, 5 writing slots 10, 11, 12
        ints = np.zeros((3, len(REQ_INT_COLUMNS)), np.int64)
        ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3] = [0, 2, 5], [3, 4, 5], 1, 1
        floats = np.zeros((3, len(REQ_FLOAT_COLUMNS)), np.float32)
        floats[:, REQ_FLOAT_COLUMNS.index("repetition_penalty")] = 1.0  # greedy, no penalties
        desc = BatchDescriptor(
            "batch",
            0,
            ints,
            floats,
            np.array([10, 11, 12]),
            np.zeros(0, np.int64),
        )
        assert runner.graphs.can_run(desc)
        runner.forward(desc, None).wait()
        changed = (k0 != before_k).any(dim=(1, 2)).nonzero().flatten().tolist()
        assert changed == [0, 10, 11, 12]  # pad slot 0 and the three real slots
        rows = (runner.table.slots != before_table).any(dim=1).nonzero().flatten().tolist()
        assert rows == [0, 2, 5, runner.table.pad_row]
    finally:
        destroy_distributed()


@cuda
def test_triton_kernels_match_the_torch_backend_on_device(monkeypatch):
    from test_attention_backends import check_fused_kernels, check_gemv_kernels, compare_backends

    compare_backends(torch.device("cuda"), torch.bfloat16, atol=2e-2)
    compare_backends(torch.device("cuda"), torch.float32, atol=1e-4)
    check_fused_kernels(torch.device("cuda"), torch.float32, monkeypatch)
    check_fused_kernels(torch.device("cuda"), torch.bfloat16, monkeypatch)
    check_gemv_kernels(torch.device("cuda"), torch.float32, monkeypatch)
    check_gemv_kernels(torch.device("cuda"), torch.bfloat16, monkeypatch)


@cuda
def test_device_tensor_on_a_channel_without_device_group_is_a_type_error():
    from pipeserve.distributed import (
        Channel,
        DistConfig,
        destroy_distributed,
        get_pp_group,
        init_distributed,
    )
    from pipeserve.utils import free_port

    init_distributed(
        DistConfig(pp_size=1, init_method=f"tcp://127.0.0.1:{free_port()}", device="cuda")
    )
    try:
        sent = get_pp_group().stats.header_sent.copy()
        with pytest.raises(TypeError, match="channel CONTROL has no device"):
            get_pp_group().isend_tensor_dict(
                {"x": torch.ones(4, device="cuda")}, dst=0, channel=Channel.CONTROL
            )
        assert get_pp_group().stats.header_sent == sent  # nothing was posted
    finally:
        destroy_distributed()


@two_gpus
@pytest.mark.parametrize(("pp", "tp"), [(2, 1), (1, 2)])
def test_pp2_and_tp2_with_graphs_equal_one_gpu(tmp_path, pp, tp):
    path = make_checkpoint(str(tmp_path), "llama", layers=4, heads=4, kv_heads=2)
    batch = prompts(10, seed=33)
    items = [(ids, GREEDY) for ids in batch] + [(ids, SAMPLED) for ids in batch[:4]]
    one = _run(path, items)
    two = _run(path, items, pp_size=pp, tp_size=tp)
    assert [o for o, _ in one] == [o for o, _ in two]
