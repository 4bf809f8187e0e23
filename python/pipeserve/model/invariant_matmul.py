"""A batch-invariant matmul for CUDA (deterministic mode): y = x @ w^T (+ b), where an output
element's reduction over K is the same whatever M is.

What fixes an element's bits is its chain of MMA steps over K, not the tile around it: K is cut
into `k_splits` ranges (from N, K and the device alone, never from M) on K_GRANULE boundaries;
each range accumulates from zero in 16-wide MMA steps, in ascending K, and the ranges are added
in order, range 0 first. The tile shape (`Tiles`) is therefore free to follow M: small tiles and
many programs for a few rows, big ones for many. That the GPU's MMA gives an element the same
bits under every shape in TABLE is a measured fact, not a given (benchmark/sweep_invariant_matmul.py
checks every shape's rows bitwise at M = 1..300 on the device; the CUDA tests check it again).
Other dtypes than bfloat16 run the REFERENCE tiles at every M.

How a tile's ranges are computed is free to follow M too, because the arithmetic is the same:
- few tiles (small M): each range is a work item of its own; it stores its fp32 partial, and the
  last of a tile's ranges to arrive (an atomic counter per tile) adds the partials in order and
  stores the output (the parallelism a one-row GEMV gets from split-K, in one launch);
- many tiles: one program runs its tile's ranges one after the other, adding them in order.
The partials live for one launch: at most splits x programs x one tile of fp32 (17 MB on an H100
at 4 ranges), within the runner's slack. Programs are persistent (`Tiles.per_sm` per SM), looping
over work items, M fastest (neighbours share the weight tile in L2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pipeserve.env import switches
from pipeserve.model.fused import silu_and_mul, silu_mul_values
from pipeserve.model.pdl import pdl_start, prefetch_l2, projection_options

K_GRANULE = 128  # K ranges start on multiples of this (a wider BLOCK_K masks a range's last block)
MAX_SPLITS = 16
MIN_SPLIT_K = 2048  # K per range at least: shorter ranges restart the K pipeline too often at
# large M (swept: 1B down, K 8192, at M = 256 took 36.7 us in 4 ranges, 49.2 us in 8)
SPLIT_BLOCK_N = 64  # the output width per work item that `k_splits` plans the grid with
MAX_TILES_APART = 4096  # tiles whose ranges run apart, at most (the counters' length)


@dataclass(frozen=True)
class Tiles:
    """One launch's tile shape. `swap`: the MMA runs over (weight rows, batch rows), so that a
    few batch rows fill its narrow side instead of padding its 64-row side."""

    block_m: int  # batch rows
    block_n: int  # output features (weight rows)
    block_k: int
    warps: int
    stages: int
    swap: bool = False
    per_sm: int = 1  # persistent programs per SM
    plain: bool = False  # one program per tile, its ranges in order (`_plain_kernel`)
    tma: bool = False  # plain tiles loaded through tensor descriptors (Hopper's TMA)


REFERENCE = Tiles(64, 128, 64, 4, 3)
# bfloat16: (largest M, tiles), the fastest of the sweep on an H100 over the 1B and 8B projections
# (benchmark/pick_invariant_tiles.py), except up to 16 rows: the sweep's weights stay in L2, and
# there the pick is the fastest with weights read from HBM, as in decode (decode_invariant_matmul.py).
# Each gave every row REFERENCE's bits (M = 1..300 with K in one range and in the sweep's number
# of ranges; 9 values of M at the other numbers tried; the rows up to 16 at 1-8 ranges)
TABLE: tuple[tuple[int, Tiles], ...] = (
    (16, Tiles(16, 32, 256, 2, 3, swap=True, plain=True, tma=True)),  # tmaswap16x32k256w2
    (64, Tiles(32, 64, 64, 4, 4, swap=True, per_sm=2)),  # swap32x64
    (256, Tiles(128, 64, 64, 4, 4, swap=True, plain=True, tma=True)),  # tmaswap128x64w4
    (2**62, Tiles(256, 128, 64, 8, 3, swap=True, plain=True, tma=True)),  # tmaswap256x128w8
)


# Exceptions to TABLE, each the faster on an H100 (docs/benchmarks-log.md):
# - APART: a few rows over a K in many ranges run the ranges apart, as programs of their own
#   (the persistent kernel), where plain tiles would run a tile's ranges one after the other.
# - WIDE: 65 to 256 rows of a wide projection (gate_up, lm_head) take 256 rows a tile, so that
#   fewer programs re-read each weight tile.
# - NARROW: deeper pipelines for a few rows of a narrow projection (decode_invariant_matmul.py);
#   PIPESERVE_NARROW_TILES=0 leaves them to TABLE, for an A/B.
APART = Tiles(16, 32, 128, 2, 4, swap=True, per_sm=4)
APART_MAX_ROWS, APART_MIN_SPLITS = 16, 4
WIDE = Tiles(256, 128, 64, 8, 3, swap=True, plain=True, tma=True)
WIDE_ROWS, WIDE_MIN_N = (65, 256), 16384
NARROW = (  # (largest N, tiles): up to 16 rows of a narrow projection (the 1B's o, qkv)
    (2048, Tiles(16, 16, 256, 1, 4, swap=True, plain=True, tma=True)),  # tmaswap16x16k256w1s4
    (3072, Tiles(16, 32, 256, 2, 4, swap=True, plain=True, tma=True)),  # tmaswap16x32k256w2s4
)


def tiles_for(m: int, n: int, dtype: torch.dtype, splits: int = 1) -> Tiles:
    """The tiles of an (m, K) @ (n, K)^T product whose K runs in `splits` ranges."""
    if dtype != torch.bfloat16:
        return REFERENCE
    if m <= APART_MAX_ROWS and splits >= APART_MIN_SPLITS:
        return APART
    if m <= TABLE[0][0] and switches().narrow_tiles:
        narrow = next((t for most, t in NARROW if n <= most), None)
        if narrow:
            return narrow
    if WIDE_ROWS[0] <= m <= WIDE_ROWS[1] and n >= WIDE_MIN_N:
        return WIDE
    return next(tiles for most, tiles in TABLE if m <= most)


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter on CPU (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """Per-tile arrival counts of the ranges run apart; every launch leaves them at zero. Made at
    the first small-M call (the runner's warm-up, before any graph capture). One set per device:
    its launches must run in turn (one stream, as a rank's forward does), or counts would mix."""
    return torch.zeros(MAX_TILES_APART, dtype=torch.int32, device=device)


def k_splits(n: int, k: int, sms: int) -> int:
    """K ranges per output element: enough for SPLIT_BLOCK_N-wide work items to cover the
    device, at least MIN_SPLIT_K of K per range, a power of two. A function of N and K (and the
    device) only, so that every M reduces an element the same way."""
    tiles_n = triton.cdiv(n, SPLIT_BLOCK_N)
    splits = 1
    while splits < MAX_SPLITS and tiles_n * splits < sms and k >= 2 * splits * MIN_SPLIT_K:
        splits *= 2
    return splits


def split_size(k: int, splits: int) -> int:
    """K per range: whole granules, so the ranges are the same under every BLOCK_K."""
    return triton.cdiv(triton.cdiv(k, splits), K_GRANULE) * K_GRANULE


@triton.jit
def _zero_tile(SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return tl.zeros([BLOCK_N, BLOCK_M] if SWAP else [BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def _range_dot(x, w, rm, rn, k_start, k_end, stride_x, stride_w, SWAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x[rm, k_start:k_end] @ w[rn, k_start:k_end]^T, from zero, in BLOCK_K steps: fp32,
    (BLOCK_M, BLOCK_N), or its transpose (BLOCK_N, BLOCK_M) when SWAP."""
    acc = _zero_tile(SWAP, BLOCK_M, BLOCK_N)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_end
        a = tl.load(x + rm[:, None] * stride_x + rk[None, :], mask=k_ok[None, :], other=0.0)
        b = tl.load(w + rn[:, None] * stride_w + rk[None, :], mask=k_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, SWAP, IEEE)
    return acc


@triton.jit
def _tile_offsets(rm, rn, m_ok, n_ok, N, SWAP: tl.constexpr):
    """Row-major (M, N) offsets of a tile and their mask, laid out as _range_dot's result."""
    offs = rm[None, :] * N + rn[:, None] if SWAP else rm[:, None] * N + rn[None, :]
    return offs, m_ok[None, :] & n_ok[:, None] if SWAP else m_ok[:, None] & n_ok[None, :]


@triton.jit(do_not_specialize=["M", "splits"])
def _matmul_kernel(x, w, bias, out, partial, counters, M, N, K, stride_x, stride_w, splits, k_per_split, prefetch_k, RANGES_APART: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr):  # fmt: skip
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles = tiles_m * tl.cdiv(N, BLOCK_N)
    items = tiles * splits if RANGES_APART else tiles
    if PREFETCH:  # the first item's weights, while the kernel ahead still runs
        first = tl.program_id(0)
        if first < items:
            k0 = first // tiles * k_per_split if RANGES_APART else 0
            k1 = tl.minimum(k0 + prefetch_k, K)
            prefetch_l2(w, (first % tiles) // tiles_m * BLOCK_N, N, k0, k1, stride_w, BLOCK_N, LINE)
    pdl_start(PDL)
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        tile = item % tiles
        rm = (tile % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tile // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows and columns past the end read row 0 / column 0 (in bounds) and are never stored
        rm_safe = tl.where(rm < M, rm, 0).to(tl.int64)
        rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)
        offs, o_mask = _tile_offsets(rm_safe, rn_safe, rm < M, rn < N, N, SWAP)
        if RANGES_APART:  # one K range; the tile's last range to arrive adds them up
            s = item // tiles
            k_start = s * k_per_split
            acc = _range_dot(x, w, rm_safe, rn_safe, k_start, tl.minimum(k_start + k_per_split, K), stride_x, stride_w, SWAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            tl.store(partial + s * M * N + offs, acc, mask=o_mask)
            tl.debug_barrier()  # every thread's partial is stored before the count says so
            if tl.atomic_add(counters + tile, 1, sem="acq_rel", scope="gpu") == splits - 1:
                total = tl.zeros_like(acc)
                for t in range(0, splits):
                    at = partial + t * M * N + offs
                    total += tl.load(at, mask=o_mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(counters + tile, 0, sem="relaxed", scope="gpu")
                if HAS_BIAS:
                    total += _bias_tile(bias, rn_safe, SWAP)
                tl.store(out + offs, total.to(out.dtype.element_ty), mask=o_mask)
        else:
            total = _zero_tile(SWAP, BLOCK_M, BLOCK_N)
            for s in range(0, splits):
                k_start = s * k_per_split
                total += _range_dot(x, w, rm_safe, rn_safe, k_start, tl.minimum(k_start + k_per_split, K), stride_x, stride_w, SWAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            if HAS_BIAS:
                total += _bias_tile(bias, rn_safe, SWAP)
            tl.store(out + offs, total.to(out.dtype.element_ty), mask=o_mask)


@triton.jit
def _mma(a, b, acc, SWAP: tl.constexpr, IEEE: tl.constexpr = False):
    """acc + a @ b^T (a: batch rows, b: weight rows), or its transpose when SWAP; IEEE: fp32
    operands at full precision (not TF32)."""
    lhs, rhs = (b, tl.trans(a)) if SWAP else (a, tl.trans(b))
    return tl.dot(lhs, rhs, acc, input_precision="ieee") if IEEE else tl.dot(lhs, rhs, acc)


@triton.jit(do_not_specialize=["M"])
def _plain_kernel(x, w, w_ptr, bias, out, M, N, K, stride_x, stride_w, k_per_split, prefetch_k, SPLITS: tl.constexpr, TMA: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr):  # fmt: skip
    """One program per tile, M fastest, its K ranges one after the other and added in order, as
    `_matmul_kernel` adds them when they do not run apart. The ranges are a loop, not unrolled:
    unrolled, a 128 x 128 tile in four ranges spilled 768 bytes (ptxas, sm_90a, Triton 3.6; as a
    loop, none). With TMA, `x` and `w` are tensor descriptors of (BLOCK_M, BLOCK_K) and (BLOCK_N,
    BLOCK_K) blocks, which read zeros past the ends. With GLU, `w` holds 2N rows (gate | up) and
    the tile stores silu(gate) * up of its two products, each first rounded as the matmul stores
    it (the rounding of `fused.silu_and_mul` after it). `w_ptr`: the weight's own pointer, for
    PREFETCH (`pdl.prefetch_l2`)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tile = tl.program_id(0)
    m0 = (tile % tiles_m) * BLOCK_M
    n0 = (tile // tiles_m) * BLOCK_N
    if PREFETCH:  # the tile's weights, while the kernel ahead still runs
        prefetch_l2(w_ptr, n0, N, 0, prefetch_k, stride_w, BLOCK_N, LINE)
        if GLU:
            prefetch_l2(w_ptr, N + n0, 2 * N, 0, prefetch_k, stride_w, BLOCK_N, LINE)
    pdl_start(PDL)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rm_safe = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)
    gate = _zero_tile(SWAP, BLOCK_M, BLOCK_N)
    up = _zero_tile(SWAP, BLOCK_M, BLOCK_N)  # GLU only
    for s in range(0, SPLITS):
        k_start = s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        if TMA:
            acc = _zero_tile(SWAP, BLOCK_M, BLOCK_N)
            acc_up = _zero_tile(SWAP, BLOCK_M, BLOCK_N)
            for k0 in range(k_start, k_end, BLOCK_K):
                a = x.load([m0, k0])
                acc = _mma(a, w.load([n0, k0]), acc, SWAP)
                if GLU:
                    acc_up = _mma(a, w.load([N + n0, k0]), acc_up, SWAP)
        else:
            acc = _range_dot(x, w, rm_safe, rn_safe, k_start, k_end, stride_x, stride_w, SWAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            if GLU:
                acc_up = _range_dot(x, w, rm_safe, rn_safe + N, k_start, k_end, stride_x, stride_w, SWAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        gate += acc
        if GLU:
            up += acc_up
    if HAS_BIAS:
        gate += _bias_tile(bias, rn_safe, SWAP)
        if GLU:
            up += _bias_tile(bias, rn_safe + N, SWAP)
    result = gate.to(out.dtype if TMA else out.dtype.element_ty)
    if GLU:
        result = silu_mul_values(result, up.to(result.dtype))
    if TMA:  # the descriptor clips the tile at the ends: no per-element offsets held
        out.store([m0, n0], tl.trans(result) if SWAP else result)
    else:
        offs, mask = _tile_offsets(rm_safe, rn_safe, rm < M, rn < N, N, SWAP)
        tl.store(out + offs, result, mask=mask)


@triton.jit
def _bias_tile(bias, rn, SWAP: tl.constexpr):
    b = tl.load(bias + rn).to(tl.float32)
    return b[:, None] if SWAP else b[None, :]


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: Tiles | None = None,
    splits: int | None = None,
    glu: bool = False,
) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T (+ bias) -> (M, N) in x's dtype. `tiles` and `splits`
    override the table and `k_splits` (the sweep). With `glu`, weight is gate | up (2I, K) and
    the result silu(gate) * up (M, I), bitwise `fused.silu_and_mul` of the (M, 2I) product: plain
    tiles compute it in the matmul's epilogue, the others after it."""
    x, weight = x.contiguous(), weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    sms = num_sms(x.device)
    splits = splits or k_splits(n, k, sms)
    t = tiles or tiles_for(m, n, x.dtype, splits)
    if glu and not t.plain:
        return silu_and_mul(matmul(x, weight, bias, t, splits), n // 2, pdl=True)
    out = torch.empty(m, n // 2 if glu else n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if t.plain:
        _plain(x, weight, bias, out, t, splits, glu)
        return out
    n_tiles = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
    programs = sms * t.per_sm
    apart = splits > 1 and n_tiles < programs  # the same sums either way (module docstring)
    partial, counters = out, out
    if apart:
        partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        counters = _counters(x.device)
    has_bias = bias is not None
    k_range = split_size(k, splits) if apart else k
    _matmul_kernel[(min(programs, n_tiles * (splits if apart else 1)),)](
        x, weight, bias if has_bias else x, out, partial, counters, m, n, k, x.stride(0),
        weight.stride(0), splits, split_size(k, splits), RANGES_APART=apart, HAS_BIAS=has_bias,
        SWAP=t.swap, IEEE=x.dtype == torch.float32, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, num_warps=t.warps, num_stages=t.stages,
        **projection_options(x, weight, k_range),
    )  # fmt: skip
    return out


GLU_MAX_TILE = 128 * 128  # glu holds two accumulators: wider tiles run at half their width
# (128 x 256 with glu spilled 2 KB and wanted 245,816 bytes of shared memory on sm_90a; 128 x 128, none)


def plain_block_n(t: Tiles, glu: bool) -> int:
    """The output width a plain tile runs at (GLU_MAX_TILE)."""
    return t.block_n // 2 if glu and t.block_m * t.block_n > GLU_MAX_TILE else t.block_n


def _tma(x: torch.Tensor, n: int, t: Tiles, splits: int) -> bool:
    """Whether plain tiles `t` of x (M, K) into n outputs load through tensor descriptors. A
    descriptor reads whole BLOCK_K blocks, past a range's end into the next range: only ranges of
    whole blocks take it (the loads with masks give the same sums)."""
    k, size = x.shape[1], x.element_size()
    rows_aligned = k * size % 16 == 0 and n * size % 16 == 0
    whole_blocks = split_size(k, splits) % t.block_k == 0
    return t.tma and x.dtype != torch.float32 and rows_aligned and whole_blocks


def _plain(x, weight, bias, out, t: Tiles, splits: int, glu: bool) -> None:
    """`_plain_kernel` over x into out."""
    (m, n), k = out.shape, x.shape[1]
    block_n = plain_block_n(t, glu)
    tma = _tma(x, n, t, splits)
    xs, ws, outs = x, weight, out
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        xs = TensorDescriptor.from_tensor(x, [t.block_m, t.block_k])
        ws = TensorDescriptor.from_tensor(weight, [block_n, t.block_k])
        outs = TensorDescriptor.from_tensor(out, [t.block_m, block_n])
    has_bias = bias is not None
    _plain_kernel[(triton.cdiv(m, t.block_m) * triton.cdiv(n, block_n),)](
        xs, ws, weight, bias if has_bias else x, outs, m, n, k, x.stride(0), weight.stride(0),
        split_size(k, splits), SPLITS=splits, TMA=tma, GLU=glu, HAS_BIAS=has_bias, SWAP=t.swap,
        IEEE=x.dtype == torch.float32, BLOCK_M=t.block_m, BLOCK_N=block_n, BLOCK_K=t.block_k,
        num_warps=t.warps, num_stages=t.stages,
        **projection_options(x, weight, k),
    )  # fmt: skip
