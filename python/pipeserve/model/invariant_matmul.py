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
- few tiles (small M, `_split_kernel`): each range is a work item of persistent programs
  (`Tiles.per_sm` per SM); it stores its fp32 partial, and the last of a tile's ranges to arrive
  (an atomic counter per tile) adds the partials in order and stores the output (the
  parallelism a one-row GEMV gets from split-K, in one launch). The partials live for one
  launch: at most splits x programs x one tile of fp32 (17 MB on an H100 at 4 ranges);
- many tiles (`_tiles_kernel`): one program per tile runs its ranges one after the other
  (unrolled: one accumulator live at a time beside the sum) and adds them in order.
Tiles are numbered M fastest (neighbours share the weight tile in L2).

The input may go through a prologue on its way to the MMA (`norm_matmul`: RMSNorm(x + residual);
`silu_mul_matmul`: SiLU(gate) * up), as the one-row GEMV path fuses them; up to FUSE_MAX_ROWS
rows, where a launch saved shows. Larger batches run the same elementwise steps as kernels of
their own first (`invariant_rows.py`), so a row's input to the MMA has the same bits either way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pipeserve.model.fused import silu_and_mul, silu_times
from pipeserve.model.invariant_rows import FP_FUSION, add_rmsnorm, normalize, row_rstd, rows_in

K_GRANULE = 128  # K ranges start on multiples of this (a multiple of every BLOCK_K)
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


REFERENCE = Tiles(64, 128, 64, 4, 3)
# bfloat16: (largest M, largest N, tiles), the first that fits: the fastest candidates of
# benchmark/sweep_invariant_matmul.py per row (pick_invariant_tiles.py), each of which gave
# every row REFERENCE's bits (M = 1..300, K in the rule's ranges) on the 1B and 8B projections
TABLE: tuple[tuple[int, int, Tiles], ...] = (
    (16, 8192, Tiles(16, 32, 128, 2, 4, swap=True, per_sm=4)),
    (16, 2**62, Tiles(16, 128, 64, 4, 4, swap=True, per_sm=2)),
    (64, 2**62, Tiles(32, 64, 64, 4, 4, swap=True, per_sm=2)),
    (2**62, 8192, Tiles(32, 128, 64, 4, 4, swap=True, per_sm=2)),
    (2**62, 2**62, Tiles(128, 128, 64, 8, 3)),
)
FUSE_MAX_ROWS = 16  # prologues run inside the matmul up to this many rows (`norm_matmul`)
PLAIN, NORM, SILU = 0, 1, 2  # the kernels' PROLOGUE


def tiles_for(m: int, n: int, dtype: torch.dtype) -> Tiles:
    if dtype != torch.bfloat16:
        return REFERENCE
    return next(tiles for most_m, most_n, tiles in TABLE if m <= most_m and n <= most_n)


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter on CPU (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """Per-tile arrival counts of the ranges run apart; every launch leaves them at zero. Made at
    the first small-M call (the runner's warm-up, before any CUDA graph capture). One set per
    device: launches on one device must run one after the other (one stream, as a rank's
    forward does); two at once on two streams would mix their counts."""
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
    if SWAP:
        tile = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return tile


@triton.jit
def _x_tile(x, res, norm_w, rm, rk, k_ok, rstd, K, stride_x, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    """The (BLOCK_M, BLOCK_K) block of the matmul's input: x's rows, or their prologue (NORM:
    rmsnorm(x + residual); SILU: silu(gate) * up of x = gate | up, K wide each)."""
    offs = rm[:, None] * stride_x + rk[None, :]
    a = rows_in(x, res, offs, k_ok[None, :], HAS_RESIDUAL)  # HAS_RESIDUAL: NORM only
    if PROLOGUE == 1:
        a = normalize(a, rstd, tl.load(norm_w + rk, mask=k_ok, other=0.0))
    elif PROLOGUE == 2:
        a = silu_times(a, tl.load(x + offs + K, mask=k_ok[None, :], other=0.0))
    return a


@triton.jit
def _range_dot(x, w, res, norm_w, rstd, rm, rn, k_start, k_end, K, stride_x, stride_w, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x[rm, k_start:k_end] @ w[rn, k_start:k_end]^T, from zero, in BLOCK_K steps: fp32,
    (BLOCK_M, BLOCK_N), or its transpose (BLOCK_N, BLOCK_M) when SWAP."""
    acc = _zero_tile(SWAP, BLOCK_M, BLOCK_N)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_end
        a = _x_tile(x, res, norm_w, rm, rk, k_ok, rstd, K, stride_x, PROLOGUE, HAS_RESIDUAL)
        b = tl.load(w + rn[:, None] * stride_w + rk[None, :], mask=k_ok[None, :], other=0.0)
        if SWAP:
            if IEEE:
                acc = tl.dot(b, tl.trans(a), acc, input_precision="ieee")
            else:
                acc = tl.dot(b, tl.trans(a), acc)
        elif IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _tile_offsets(rm, rn, N, SWAP: tl.constexpr):
    """Row-major (M, N) offsets of a tile, laid out as _range_dot's result."""
    return rm[None, :] * N + rn[:, None] if SWAP else rm[:, None] * N + rn[None, :]


@triton.jit
def _tile_mask(m_ok, n_ok, SWAP: tl.constexpr):
    return m_ok[None, :] & n_ok[:, None] if SWAP else m_ok[:, None] & n_ok[None, :]


@triton.jit
def _tile_rows(tile, M, N, tiles_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's rows and columns, those past the end moved to row / column 0 (in bounds: read,
    never stored), and which are in bounds."""
    rm = (tile % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tile // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    return tl.where(m_ok, rm, 0).to(tl.int64), tl.where(n_ok, rn, 0).to(tl.int64), m_ok, n_ok


@triton.jit
def _prologue_rstd(x, res, summed, rm, m_ok, K, stride_x, eps, first, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """The rows' 1 / RMS for the NORM prologue (zeros otherwise); the `first` (nonzero) work
    item of a row block stores its x + residual."""
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == 1:
        sum_ok = m_ok & (tl.arange(0, BLOCK_M) * 0 + first != 0)  # a vector: the interpreter
        rstd = row_rstd(x, res, summed, rm, sum_ok, K, stride_x, eps, HAS_RESIDUAL, BLOCK_M)  # fmt: skip
    return rstd


@triton.jit
def _store_tile(out, bias, total, rn, offs, o_mask, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr):
    if HAS_BIAS:
        b = tl.load(bias + rn).to(tl.float32)
        total += b[:, None] if SWAP else b[None, :]
    tl.store(out + offs, total.to(out.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["M", "eps"])
def _tiles_kernel(x, w, bias, out, res, norm_w, summed, eps, M, N, K, stride_x, stride_w, k_per_split, SPLITS: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Many tiles: one program per tile, M fastest (neighbours share the weight tile in L2),
    its K ranges run one after the other and added in order."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tile = tl.program_id(0)
    rm, rn, m_ok, n_ok = _tile_rows(tile, M, N, tiles_m, BLOCK_M, BLOCK_N)
    first = tile < tiles_m  # the first column of tiles
    rstd = _prologue_rstd(x, res, summed, rm, m_ok, K, stride_x, eps, first, PROLOGUE, HAS_RESIDUAL, BLOCK_M)  # fmt: skip
    total = _zero_tile(SWAP, BLOCK_M, BLOCK_N)
    for s in tl.static_range(SPLITS):
        k_start = s * k_per_split
        total += _range_dot(x, w, res, norm_w, rstd, rm, rn, k_start, tl.minimum(k_start + k_per_split, K), K, stride_x, stride_w, PROLOGUE, HAS_RESIDUAL, SWAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    offs = _tile_offsets(rm, rn, N, SWAP)
    _store_tile(out, bias, total, rn, offs, _tile_mask(m_ok, n_ok, SWAP), HAS_BIAS, SWAP)


@triton.jit(do_not_specialize=["M", "splits", "eps"])
def _split_kernel(x, w, bias, out, partial, counters, res, norm_w, summed, eps, M, N, K, stride_x, stride_w, splits, k_per_split, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Few tiles: each (tile, K range) is a work item of persistent programs; the tile's last
    range to arrive adds the fp32 partials in order."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles = tiles_m * tl.cdiv(N, BLOCK_N)
    for item in range(tl.program_id(0), tiles * splits, tl.num_programs(0)):
        tile, s = item % tiles, item // tiles
        rm, rn, m_ok, n_ok = _tile_rows(tile, M, N, tiles_m, BLOCK_M, BLOCK_N)
        first = item < tiles_m  # range 0 of the first column of tiles
        rstd = _prologue_rstd(x, res, summed, rm, m_ok, K, stride_x, eps, first, PROLOGUE, HAS_RESIDUAL, BLOCK_M)  # fmt: skip
        k_start = s * k_per_split
        acc = _range_dot(x, w, res, norm_w, rstd, rm, rn, k_start, tl.minimum(k_start + k_per_split, K), K, stride_x, stride_w, PROLOGUE, HAS_RESIDUAL, SWAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        # after the K loop, not live across it; int32: few tiles (splits x M x N < 2**31)
        offs = _tile_offsets(rm.to(tl.int32), rn.to(tl.int32), N, SWAP)
        o_mask = _tile_mask(m_ok, n_ok, SWAP)
        tl.store(partial + s * M * N + offs, acc, mask=o_mask)
        tl.debug_barrier()  # every thread's partial is stored before the count says so
        if tl.atomic_add(counters + tile, 1, sem="acq_rel", scope="gpu") == splits - 1:
            total = tl.zeros_like(acc)
            for t in range(0, splits):
                at = partial + t * M * N + offs
                total += tl.load(at, mask=o_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counters + tile, 0, sem="relaxed", scope="gpu")
            _store_tile(out, bias, total, rn, offs, o_mask, HAS_BIAS, SWAP)


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: Tiles | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T (+ bias) -> (M, N) in x's dtype. `tiles` and `splits`
    override the table and `k_splits` (the sweep)."""
    return _launch(PLAIN, x.contiguous(), weight, bias, tiles, splits)


def norm_matmul(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    fuse: bool | None = None,
    tiles: Tiles | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(matmul(rmsnorm(x + residual), weight, bias), x + residual); the norm in the matmul's
    prologue up to FUSE_MAX_ROWS rows (`fuse` overrides), else `invariant_rows.add_rmsnorm`
    first: the same bits."""
    if not (x.shape[0] <= FUSE_MAX_ROWS if fuse is None else fuse):
        normed, summed = add_rmsnorm(x, residual, norm_weight, eps)
        return matmul(normed, weight, bias, tiles, splits), summed
    x = x.contiguous()
    summed = x if residual is None else torch.empty_like(x)
    res = None if residual is None else residual.contiguous()
    norm = (res, norm_weight, summed, eps)
    return _launch(NORM, x, weight, bias, tiles, splits, norm), summed


def silu_mul_matmul(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    fuse: bool | None = None,
    tiles: Tiles | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """matmul(silu(gate) * up, weight) for gate_up (M, 2 K), weight (N, K); SiLU in the matmul's
    prologue up to FUSE_MAX_ROWS rows (`fuse` overrides), else `fused.silu_and_mul` first: the
    same bits."""
    inter = weight.shape[1]
    if not (gate_up.shape[0] <= FUSE_MAX_ROWS if fuse is None else fuse):
        return matmul(silu_and_mul(gate_up, inter), weight, None, tiles, splits)
    return _launch(SILU, gate_up.contiguous(), weight, None, tiles, splits)


def _launch(prologue, x, weight, bias, tiles=None, splits=None, norm=None):  # fmt: skip
    """The matmul of x's rows (or of their prologue: NORM with norm = (residual, norm weight,
    summed, eps); SILU with x = gate | up) and weight."""
    weight = weight.contiguous()
    m, (n, k) = x.shape[0], weight.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    t = tiles or tiles_for(m, n, x.dtype)
    sms = num_sms(x.device)
    splits = splits or k_splits(n, k, sms)
    n_tiles = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
    programs = sms * t.per_sm
    res, norm_w, summed, eps = norm or (None, x, x, 0.0)
    args = dict(
        res=x if res is None else res, norm_w=norm_w, summed=summed, eps=eps, M=m, N=n, K=k,
        stride_x=x.stride(0), stride_w=weight.stride(0), k_per_split=split_size(k, splits),
        PROLOGUE=prologue, HAS_RESIDUAL=res is not None, HAS_BIAS=bias is not None,
        SWAP=t.swap, IEEE=x.dtype == torch.float32, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, num_warps=t.warps, num_stages=t.stages, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    b = x if bias is None else bias
    if splits > 1 and n_tiles < programs:  # the same sums either way (module docstring)
        partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        grid = (min(programs, n_tiles * splits),)
        _split_kernel[grid](x, weight, b, out, partial, _counters(x.device), splits=splits, **args)
    else:
        _tiles_kernel[(n_tiles,)](x, weight, b, out, SPLITS=splits, **args)
    return out
