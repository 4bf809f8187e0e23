"""The attention backends against each other: Triton's paged kernels (under Triton's interpreter
on CPU, compiled on CUDA) and the torch SDPA backend, on small ragged batches; and each backend's
hooks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeserve.env import Env
from pipeserve.model.attention import BackendSpec, create_backend
from pipeserve.model.forward_batch import INDEX_ROWS, ROW, ForwardBatch
from pipeserve.model.fused import store_kv

triton = pytest.importorskip("triton")  # on CPU, conftest.py sets TRITON_INTERPRET=1
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors in Triton kernels need its interpreter (the CUDA tests cover the GPU)",
)

H, HKV, D, SLOTS, ROWS, CTX = 8, 2, 16, 256, 7, 96


def _batch(device, prefix, extend, rows, rng, pad_to=0):
    table = torch.zeros(ROWS + 1, CTX, dtype=torch.int32, device=device)
    free = rng.permutation(np.arange(1, SLOTS))
    used = 0
    out_slots = []
    for row, p, n in zip(rows, prefix, extend, strict=True):
        slots = free[used : used + p + n]
        used += p + n
        table[row, : p + n] = torch.from_numpy(slots.astype(np.int32))
        out_slots.extend(slots[p:].tolist())
    fb = ForwardBatch.build(rows, prefix, extend, out_slots, device, pad_to=pad_to, pad_row=ROWS)
    return table, fb


def _attend(name, device, dtype, table, fb, q, k, v, caches):
    spec = BackendSpec(H, HKV, D, max_batch=ROWS, device=device)
    backend = create_backend(name, spec, table)
    fb.attn = None
    backend.prepare_metadata(fb)
    kc, vc = (c.clone() for c in caches)
    store_kv(k, v, kc, vc, fb.out_slots)  # the layer's part, before any backend attends
    return backend.forward(q, k, v, (kc, vc), fb, D**-0.5), kc


CASES = {
    "decode-gqa-ragged": ([0, 5, 17, 40, 2], [1, 1, 1, 1, 1]),
    "prefix-and-extend": ([0, 9, 30], [12, 7, 33]),
    "mixed": ([4, 0, 20, 11], [1, 25, 1, 6]),
}


def compare_backends(device: torch.device, dtype: torch.dtype, atol: float) -> None:
    rng = np.random.default_rng(0)
    for prefix, extend in CASES.values():
        rows = list(rng.permutation(ROWS)[: len(prefix)])
        for pad_to in (0, len(prefix) + 2):
            if pad_to and max(extend) > 1:
                continue  # pad requests ride only decode batches (CUDA graphs)
            table, fb = _batch(device, prefix, extend, rows, rng, pad_to)
            n = fb.out_slots.numel()
            q, k, v = (torch.randn(n, h, D, device=device, dtype=dtype) for h in (H, HKV, HKV))
            caches = [torch.randn(SLOTS, HKV, D, device=device, dtype=dtype) for _ in range(2)]
            ours, kc = _attend("triton", device, dtype, table, fb, q, k, v, caches)
            ref, kc_ref = _attend("torch", device, dtype, table, fb, q, k, v, caches)
            real = int(fb.extend_lens[: len(prefix)].sum())
            # pad requests all write the pad slot 0, in any order: compare the real slots
            assert torch.equal(kc[1:], kc_ref[1:])
            torch.testing.assert_close(ours[:real].float(), ref[:real].float(), atol=atol, rtol=0)


@interpreted
def test_triton_kernels_match_torch_on_cpu():
    compare_backends(torch.device("cpu"), torch.float32, atol=1e-5)


def test_triton_decode_split_count_is_a_function_of_batch_size():
    from pipeserve.model.attention.triton_backend import num_splits

    cpu = torch.device("cpu")
    assert num_splits(1, HKV, cpu) == num_splits(1, HKV, cpu)
    spec = BackendSpec(H, HKV, D, max_batch=ROWS, device=cpu)
    backend = create_backend("triton", spec, torch.zeros(ROWS + 1, CTX, dtype=torch.int32))
    _, fb = _batch(cpu, [3, 4], [1, 1], [0, 1], np.random.default_rng(1))
    backend.init_capture(ROWS)
    backend.prepare_capture(fb)
    part_out, part_lse = fb.attn
    assert part_out.shape[:3] == (2, H, num_splits(2, HKV, cpu)) == part_lse.shape
    backend.prepare_replay(fb)  # reads lengths from the static buffers: nothing to refresh


def test_torch_backend_refuses_cuda_graph_hooks():
    cpu = torch.device("cpu")
    spec = BackendSpec(H, HKV, D, max_batch=ROWS, device=cpu)
    backend = create_backend("torch", spec, torch.zeros(ROWS + 1, CTX, dtype=torch.int32))
    assert not backend.supports_cuda_graph
    for hook in (lambda: backend.init_capture(4), lambda: backend.prepare_capture(None)):
        with pytest.raises(NotImplementedError, match="cannot run inside CUDA graphs"):
            hook()


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    from pipeserve.model.attention import resolve_backend_name

    assert resolve_backend_name("auto", "cpu") == "torch"
    assert resolve_backend_name("auto", "cuda") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend_name("triton", "cpu")
    with pytest.raises(ValueError, match="auto, torch or triton"):
        resolve_backend_name("flash", "cpu")


@interpreted
def test_engine_with_triton_backend_equals_torch_backend(tmp_path):
    from checkpoints import make_checkpoint
    from pipeserve import Engine

    path = make_checkpoint(str(tmp_path), "llama", layers=2, heads=4, kv_heads=2, hidden=32)
    batch = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    outs = {}
    for name in ("torch", "triton"):
        with Engine(model_path=path, device="cpu", attention_backend=name) as engine:
            outs[name] = [
                o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=params)
            ]
    assert outs["torch"] == outs["triton"]


@interpreted
def test_fused_layer_kernels_match_their_torch_versions(monkeypatch):
    """Under Triton's interpreter on CPU (compiled on CUDA, see test_cuda_graphs)."""
    check_fused_kernels(torch.device("cpu"), torch.float32, monkeypatch)


def check_fused_kernels(device: torch.device, dtype: torch.dtype, monkeypatch) -> None:
    from pipeserve.model import fused

    g = torch.Generator(device=device).manual_seed(0)
    x, res = (torch.randn(5, 96, device=device, dtype=dtype, generator=g) for _ in range(2))
    w = torch.randn(96, device=device, dtype=dtype, generator=g)
    qk = torch.randn(5, 30, device=device, dtype=dtype, generator=g)[:, :24].view(5, 3, 8)
    cos, sin = (torch.randn(5, 8, device=device, dtype=dtype, generator=g) for _ in range(2))
    gate_up = torch.randn(5, 2 * 40, device=device, dtype=dtype, generator=g)
    kv = torch.randn(5, 2, 8, device=device, dtype=dtype, generator=g)
    slots = torch.tensor([7, 3, 0, 9, 1], device=device)

    # q | k | v of a layer with 3 heads and 2 KV heads of 8 (rows padded, as a strided view)
    qkv = torch.randn(5, 60, device=device, dtype=dtype, generator=g)[:, :56]

    def run() -> list[torch.Tensor]:
        caches = [torch.zeros(12, 2, 8, device=device, dtype=dtype) for _ in range(2)]
        fused.store_kv(kv, kv * 2, *caches, slots)
        fused_caches = [torch.zeros(12, 2, 8, device=device, dtype=dtype) for _ in range(2)]
        rotated = qkv.clone()
        fused.rotate_store_kv_(rotated, 3, 2, cos, sin, *fused_caches, slots)
        return [
            *fused.add_rmsnorm(x, res, w, 1e-6),
            fused.add_rmsnorm(x, None, w, 1e-6)[0],
            fused.rotate_(qk.clone(), cos, sin),
            fused.silu_and_mul(gate_up, 40),
            *caches,
            rotated,
            *fused_caches,
        ]

    monkeypatch.setattr(fused, "FORCE_TRITON", False)
    want = run()
    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    got = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


@interpreted
def test_small_batch_gemv_matches_the_unfused_ops(monkeypatch):
    """Under Triton's interpreter on CPU (compiled on CUDA, see test_cuda_graphs)."""
    check_gemv_kernels(torch.device("cpu"), torch.float32, monkeypatch)


def check_gemv_kernels(device: torch.device, dtype: torch.dtype, monkeypatch) -> None:
    """gemv's three forms for 1..4 rows against F.linear after the torch norm / SiLU * up, on
    widths that no block divides."""
    from pipeserve.model import fused, gemv

    g = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype, generator=g)

    w, bias, norm_w = rand(40, 96), rand(40), rand(96).abs() + 0.5
    # the kernel takes up to 4 rows; the default is 1
    monkeypatch.setattr(gemv, "switches", lambda: Env(gemv_max_rows=4))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for rows in (1, 2, 3, 4):
        x, res, gate_up = rand(rows, 96), rand(rows, 96), rand(rows, 192)
        monkeypatch.setattr(fused, "FORCE_TRITON", False)
        want = [
            F.linear(x, w, bias),
            F.linear(fused.add_rmsnorm(x, res, norm_w, 1e-6)[0], w, bias),
            x + res,
            F.linear(fused.add_rmsnorm(x, None, norm_w, 1e-6)[0], w),
            x,
            F.linear(fused.silu_and_mul(gate_up, 96), w),
        ]
        monkeypatch.setattr(fused, "FORCE_TRITON", True)
        assert gemv.fits(x, w) and not gemv.fits(rand(5, 96), w)
        assert not gemv.fits(x, rand(gemv.MAX_OUT + 1, 96))  # wide outputs stay with cuBLAS
        got = [
            gemv.linear(x, w, bias),
            *gemv.norm_linear(x, res, norm_w, 1e-6, w, bias),
            *gemv.norm_linear(x, None, norm_w, 1e-6, w),
            gemv.silu_mul_linear(gate_up, 96, w),
        ]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=0)


@interpreted
def test_decoder_layer_through_gemv_equals_the_unfused_layer(tmp_path, monkeypatch):
    """A Qwen2 layer (q/k/v biases) on three decodes (gemv taking up to four rows): outputs and
    the KV it stores agree."""
    from checkpoints import make_checkpoint
    from pipeserve.model import fused, gemv
    from pipeserve.model.config import ModelConfig
    from pipeserve.model.loader import load_weights
    from pipeserve.model.parallel import ParallelContext
    from pipeserve.model.registry import build_stage_model

    path = make_checkpoint(str(tmp_path), "qwen2", layers=1, heads=4, kv_heads=2, hidden=32)
    cfg = ModelConfig.from_dir(path)
    model = build_stage_model(cfg, ParallelContext(), torch.float32, torch.device("cpu"))
    load_weights(model, path)
    layer, d = model.layers[0], cfg.head_dim
    table = torch.zeros(4, 16, dtype=torch.int32)
    table[:3, :8] = torch.arange(1, 25, dtype=torch.int32).view(3, 8)
    fb = ForwardBatch.build([0, 1, 2], [3, 7, 0], [1, 1, 1], [4, 16, 17], torch.device("cpu"))
    backend = create_backend("torch", BackendSpec(4, 2, d, 3, torch.device("cpu")), table)
    backend.prepare_metadata(fb)
    g = torch.Generator().manual_seed(1)
    hidden, residual = (torch.randn(3, 32, generator=g) for _ in range(2))
    caches = [torch.randn(32, 2, d, generator=g) for _ in range(2)]
    rope = model.rotary.cos_sin(fb.positions, torch.float32)

    def run() -> list[torch.Tensor]:
        kv = tuple(c.clone() for c in caches)
        return [*layer(hidden, residual, rope, fb, kv, backend), *kv]

    monkeypatch.setattr(gemv, "switches", lambda: Env(gemv_max_rows=4))
    monkeypatch.setattr(fused, "FORCE_TRITON", False)
    want = run()
    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    got = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gemv_row_limit_from_the_environment_is_checked():
    from pipeserve.env import gemv_max_rows

    assert gemv_max_rows("0") == 0 and gemv_max_rows(" 4 ") == 4
    for bad in ("-1", "two", "", "5"):
        with pytest.raises(ValueError, match="PIPESERVE_GEMV_MAX_ROWS must be a whole number"):
            gemv_max_rows(bad)


@interpreted
def test_gemv_tails_and_long_rows(monkeypatch):
    """Blocks that leave an output tail and several passes over K, for each prologue; the long
    down-projection branch of the block choice; inputs the kernel does not take go to torch."""
    from pipeserve.model import fused, gemv

    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    g = torch.Generator().manual_seed(3)
    w, bias, norm_w = torch.randn(37, 100, generator=g), torch.randn(37), torch.rand(100) + 0.5
    for rows in (1, 3):
        x, res, gate_up = (torch.randn(rows, k, generator=g) for k in (100, 100, 200))
        for blocks in ((8, 32), (4, 64)):
            summed = torch.empty_like(x)
            got = [
                gemv._launch(gemv.NONE, x, w, bias, blocks=blocks),
                gemv._launch(gemv.NORM, x, w, None, res, norm_w, 1e-6, summed, blocks),
                gemv._launch(gemv.SILU, gate_up, w, None, blocks=blocks),
            ]
            monkeypatch.setattr(fused, "FORCE_TRITON", False)
            want = [
                F.linear(x, w, bias),
                F.linear(fused.add_rmsnorm(x, res, norm_w, 1e-6)[0], w),
                F.linear(fused.silu_and_mul(gate_up, 100), w),
            ]
            monkeypatch.setattr(fused, "FORCE_TRITON", True)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)
            torch.testing.assert_close(summed, x + res)
    assert gemv.choose_blocks(2048, 8192, 1) == (4, 2048)  # 1B down
    assert gemv.choose_blocks(4096, 14336, 1) == (8, 1024)  # 8B down
    assert gemv.choose_blocks(3072, 2048, 1) == (4, 1024)  # 1B qkv
    one = torch.randn(1, 100, generator=g)
    assert gemv.fits(one, w) and not gemv.fits(one.double(), w)
    assert not gemv.fits(torch.randn(1, 99), w) and not gemv.fits(one, w.t().contiguous().t())


def test_decode_pack_written_in_place_equals_the_padded_pack():
    """A graph replay's index rows, written into a reused block (over stale values), are the
    padded `pack` of the same decode batch."""
    rows, prefix, slots = np.array([5, 0, 3]), np.array([9, 2, 40]), np.array([17, 4, 99])
    delta = np.array([0, -6, 0])  # a multimodal request's rotary runs behind its positions
    k = len(INDEX_ROWS)
    for bs in (3, 4, 8):
        ones = np.ones(3, np.int64)
        want, *_ = ForwardBatch.pack(rows, prefix, ones, slots, bs, pad_row=7, rope_delta=delta)
        block = np.full(k * 8 + 5, -1, np.int64)
        ForwardBatch.pack_decode_into(block, bs, rows, prefix, slots, pad_row=7, rope_delta=delta)
        np.testing.assert_array_equal(block[: k * bs], want)
        assert (block[k * bs :] == -1).all()
        assert block[ROW["rope_positions"] * bs + 1] == 2 - 6
