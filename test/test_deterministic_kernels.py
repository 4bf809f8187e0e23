"""Deterministic mode's Triton kernels (the CUDA path): the batch-invariant matmul and paged
attention give a row the same bits whatever M, batch, chunking or decode/extend. On CPU they run
under Triton's interpreter with a row-exact tile product (see `row_exact_interpreter_dot`): that
checks the kernels' schedule (fixed tiles and K ranges, fixed key splits, merges in order, the
causal future adding exact zeros). Whether the GPU's MMA tiles keep a row's bits wherever it sits
is checked by the CUDA tests here, on a GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from invariance import probe_runs, row_exact_interpreter_dot

pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors in Triton need its interpreter"
)


def check_matmul_rows(device: torch.device, dtype: torch.dtype, sizes: list[int]) -> None:
    from pipeserve.model import invariant_matmul as im

    gen = torch.Generator().manual_seed(0)
    shapes = [(192, 64, False), (640, 320, True), (96, 1280, False)]
    if device.type == "cuda":
        shapes += [(4096, 4096, False), (6144, 4096, True), (128256, 2048, False)]
        shapes += [(2048, 8192, False)]  # K in 4 ranges: few rows run them apart (APART)
        shapes += [(2048, 2048, False), (3072, 2048, True)]  # the 1B's o and qkv
    for n, k, bias in shapes:
        w = (torch.randn(n, k, generator=gen) * 0.05).to(device, dtype)
        b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
        x = torch.randn(max(sizes), k, generator=gen).to(device, dtype)
        full = im.matmul(x, w, b)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(full.float(), F.linear(x, w, b).float(), atol=tol, rtol=tol)
        for m in sizes:
            assert torch.equal(im.matmul(x[:m], w, b), full[:m]), (n, k, m)
        assert torch.equal(im.matmul(x[7:8], w, b), full[7:8])  # a row alone (the GEMV case)


def check_glu_rows(device: torch.device, sizes: list[int], tiles: list) -> None:
    """matmul(glu=True): silu(gate) * up, in the epilogue of plain tiles, bitwise the product
    followed by `fused.silu_and_mul`, at any M (bf16)."""
    from pipeserve.model import fused
    from pipeserve.model import invariant_matmul as im

    gen = torch.Generator().manual_seed(1)
    shapes = [(2 * 96, 640, True), (2 * 200, 256, False)]
    if device.type == "cuda":
        shapes += [(2 * 8192, 2048, False), (2 * 14336, 4096, False)]
    for n, k, bias in shapes:
        w = (torch.randn(n, k, generator=gen) * 0.05).to(device, torch.bfloat16)
        b = torch.randn(n, generator=gen).to(device, torch.bfloat16) if bias else None
        x = torch.randn(max(sizes), k, generator=gen).to(device, torch.bfloat16)
        want = fused.silu_and_mul(im.matmul(x, w, b, im.REFERENCE), n // 2)
        for t in tiles:
            for m in sizes:
                got = im.matmul(x[:m], w, b, t, glu=True)
                assert torch.equal(got, want[:m]), (n, k, t, m)


@interpreted
def test_glu_epilogue_gives_the_silu_kernels_bits_interpreted(monkeypatch):
    from pipeserve.model import fused
    from pipeserve.model import invariant_matmul as im

    monkeypatch.setattr(fused, "FORCE_TRITON", True)  # the silu kernel on CPU tensors too
    plain = [
        im.Tiles(64, 128, 64, 8, 3, plain=True),
        im.Tiles(16, 32, 128, 2, 4, swap=True, plain=True, tma=True),
        im.Tiles(128, 256, 64, 8, 3, plain=True, tma=True),  # past GLU_MAX_TILE: half as wide
        im.APART,  # not plain: the silu kernel after the matmul
    ]
    with row_exact_interpreter_dot():
        check_glu_rows(torch.device("cpu"), [1, 5, 70], plain)


@interpreted
def test_matmul_rows_do_not_depend_on_m_interpreted():
    with row_exact_interpreter_dot():
        check_matmul_rows(torch.device("cpu"), torch.float32, [1, 2, 3, 17, 64, 65, 130, 200])


@interpreted
def test_matmul_k_ranges_are_a_function_of_the_shape_only():
    from pipeserve.model.invariant_matmul import k_splits, split_size

    assert k_splits(2048, 8192, 132) == 4  # few output tiles, a long K: split for parallelism
    assert k_splits(4096, 4096, 132) == 2 and k_splits(128256, 4096, 132) == 1
    assert k_splits(3072, 2048, 132) == 1  # too short a K to split
    assert split_size(14336, 4) == 3584 and split_size(640, 3) == 256  # whole 128-wide granules


def test_narrow_tiles_take_a_few_rows_of_a_narrow_projection_when_switched_on(monkeypatch):
    from pipeserve.env import Env
    from pipeserve.model import invariant_matmul as im

    bf16 = torch.bfloat16
    for narrow in (False, True):
        monkeypatch.setattr(im, "switches", lambda narrow=narrow: Env(narrow_tiles=narrow))
        small = im.TABLE[0][1]
        assert im.tiles_for(1, 2048, bf16) == (im.NARROW[0][1] if narrow else small)
        assert im.tiles_for(16, 3072, bf16) == (im.NARROW[1][1] if narrow else small)
        assert im.tiles_for(17, 2048, bf16) == im.TABLE[1][1]  # more rows: the table's
        assert im.tiles_for(1, 4096, bf16) == small  # a wider projection: the table's
        assert im.tiles_for(1, 2048, bf16, splits=4) == im.APART
        assert im.tiles_for(1, 2048, torch.float32) == im.REFERENCE


@interpreted
def test_every_tile_shape_gives_a_row_the_same_bits_interpreted():
    """The table's tiles (operands swapped) and REFERENCE, with K in one range or split in ranges
    that run apart (few tiles: the last range to arrive adds them up) or in one program (many
    tiles), and plain tiles (one program each) of any BLOCK_K, give each row the same bits at
    any M."""
    from pipeserve.model import invariant_matmul as im

    gen = torch.Generator().manual_seed(0)
    plain = [  # one program per tile, pointer loads and tensor descriptors, swapped and not
        im.Tiles(64, 128, 64, 8, 3, plain=True),
        im.Tiles(128, 64, 128, 8, 3, plain=True, tma=True),
        im.Tiles(16, 32, 128, 2, 4, swap=True, plain=True, tma=True),
        im.Tiles(128, 64, 64, 4, 3, swap=True, plain=True, tma=True),  # rows past M: clipped
    ]
    every = [im.REFERENCE, *(tiles for _, tiles in im.TABLE), im.APART, im.WIDE, *plain]
    every += [tiles for _, tiles in im.NARROW]
    with row_exact_interpreter_dot():
        for n, k, splits, bias in [(300, 640, 3, True), (96, 1280, 2, False), (200, 256, 1, False)]:
            w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
            b = torch.randn(n, generator=gen).bfloat16() if bias else None
            x = torch.randn(70, k, generator=gen).bfloat16()
            full = im.matmul(x, w, b, im.REFERENCE, splits)
            torch.testing.assert_close(
                full.float(), F.linear(x, w, b).float(), atol=2e-2, rtol=2e-2
            )
            for tiles in every:
                for m in (1, 5, 70):
                    got = im.matmul(x[:m], w, b, tiles, splits)
                    assert torch.equal(got, full[:m]), (n, k, tiles, m)


@interpreted
@pytest.mark.parametrize(
    "heads, dtype",  # gqa20 (a group wider than the kernel's head block) in one dtype: 25 s each
    [
        pytest.param(heads, dtype, id=f"{name}-{dname}")
        for heads, name in [((8, 2), "gqa4"), ((2, 2), "mha"), ((40, 2), "gqa20")]
        for dtype, dname in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]
        if (name, dname) != ("gqa20", "fp32")
    ],
)
def test_attention_is_the_same_in_any_batch_and_chunking_interpreted(heads, dtype):
    """A request attended whole, in chunks, a token at a time, and among random others."""
    with row_exact_interpreter_dot():
        whole, *others = probe_runs("triton_invariant", dtype, heads, 60, np.random.default_rng(0))
    for run in others:
        assert torch.equal(run, whole)


@interpreted
def test_attention_over_several_key_splits_interpreted(monkeypatch):
    """200 keys in splits of 128 (two blocks each, where the engine's are 256 keys: the same
    code, fewer interpreted steps): two splits, merged in order (decode) or as they come
    (extend); a decode's splits in programs of their own or one after the other in one program
    (a batch that fills the GPU) alike."""
    from pipeserve.model.attention import invariant_kernels

    monkeypatch.setattr(invariant_kernels, "SPLIT_TOKENS", 2 * invariant_kernels.BLOCK_N)
    with row_exact_interpreter_dot():
        runs = probe_runs("triton_invariant", torch.float32, (4, 2), 200, np.random.default_rng(0))
        ref = probe_runs("torch_invariant", torch.float32, (4, 2), 200, np.random.default_rng(0))
        monkeypatch.setattr(invariant_kernels, "BUSY_PROGRAMS", 1)
        monkeypatch.setattr(invariant_kernels, "MIN_GRID_SPLITS", 1)
        serial = probe_runs(  # decodes: the kernel whose grid BUSY_PROGRAMS sets
            "triton_invariant",
            torch.float32,
            (4, 2),
            200,
            np.random.default_rng(0),
            ways=("decode",),
        )
    whole, *others = runs
    for run in [*others, *serial]:
        assert torch.equal(run, whole)
    torch.testing.assert_close(whole, ref[0], atol=1e-5, rtol=0)


@cuda
@pytest.mark.parametrize(
    "dtype, narrow",
    [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16", "bf16-narrow"],  # narrow: NARROW's tiles up to 16 rows (else TABLE's)
)
def test_matmul_rows_do_not_depend_on_m_cuda(dtype, narrow, monkeypatch):
    from pipeserve.env import Env
    from pipeserve.model import invariant_matmul as im

    monkeypatch.setattr(im, "switches", lambda: Env(narrow_tiles=narrow))
    sizes = [1, 2, 3, 8, 16, 17, 64, 65, 127, 128, 256, 300, 1000, 2048]  # the table's bounds
    check_matmul_rows(torch.device("cuda"), dtype, sizes)
    if dtype == torch.bfloat16:
        check_glu_rows(torch.device("cuda"), sizes, [None])  # the table's tiles


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(8, 2), (2, 2), (40, 2)], ids=["gqa4", "mha", "gqa20"])
def test_attention_is_the_same_in_any_batch_and_chunking_cuda(dtype, heads):
    cuda_device = torch.device("cuda")
    rng = np.random.default_rng(0)
    whole, *others = probe_runs("triton_invariant", dtype, heads, 300, rng, cuda_device)
    for run in others:
        assert torch.equal(run, whole)


@cuda
def test_decode_attention_bits_do_not_depend_on_its_programs_cuda(monkeypatch):
    """Decodes over 300 keys (two splits) with one and two programs along the splits, the
    scratch filled with NaN first: the bits of the whole prompt's extend each time (a program
    merges only partials that every thread has stored)."""
    from pipeserve.model.attention import invariant_kernels, triton_invariant

    backend = triton_invariant.TritonInvariantBackend
    init = backend.__init__

    def poisoned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.part_out.fill_(float("nan"))
        self.part_lse.fill_(float("nan"))

    monkeypatch.setattr(backend, "__init__", poisoned)
    cuda_device = torch.device("cuda")
    probe = dict(dtype=torch.bfloat16, heads=(8, 2), length=300, device=cuda_device)
    (whole,) = probe_runs(
        "triton_invariant", **probe, rng=np.random.default_rng(0), ways=("whole",)
    )
    for busy, floor in [(1, 1), (1, 2), (invariant_kernels.BUSY_PROGRAMS, 1)]:
        monkeypatch.setattr(invariant_kernels, "BUSY_PROGRAMS", busy)
        monkeypatch.setattr(invariant_kernels, "MIN_GRID_SPLITS", floor)
        (decoded,) = probe_runs(
            "triton_invariant", **probe, rng=np.random.default_rng(0), ways=("decode",)
        )
        assert torch.equal(decoded, whole), (busy, floor)
