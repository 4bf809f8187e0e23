"""A batch-invariant matmul for CUDA (deterministic mode): y = x @ w^T (+ b), where an output
element's reduction over K is the same whatever M is.

One tile shape for every M (BLOCK_M x BLOCK_N, K in BLOCK_K steps, one compiled kernel: M is not
specialised), so every element is the same chain of MMA steps. K is cut into a fixed number of
ranges (`k_splits`, from N, K and the device alone, never from M); each range accumulates from
zero and the ranges are added in order, range 0 first. How the ranges are computed is free to
follow M, because the arithmetic is the same either way:
- few output tiles (small M): each range is a program of its own, and a second kernel adds the
  ranges' fp32 partials in order (the parallelism a one-row GEMV gets from split-K);
- many tiles: each program runs its tile's ranges one after the other, adding them in order.
Programs are persistent: one per SM at most, looping over tiles, M fastest (neighbours share
the weight tile in L2).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 128, 64
NUM_WARPS, NUM_STAGES = 4, 3
MAX_SPLITS = 8


@functools.cache
def num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter on CPU (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


def k_splits(n: int, k: int, programs: int) -> int:
    """K ranges per output element: enough for the output tiles of one M tile to cover the
    device, at least 4 K steps per range, a power of two. A function of N and K (and the
    device) only, so that every M reduces an element the same way."""
    tiles_n = triton.cdiv(n, BLOCK_N)
    splits = 1
    while splits < MAX_SPLITS and tiles_n * splits < programs and k >= 8 * splits * BLOCK_K:
        splits *= 2
    return splits


@triton.jit
def _range_dot(x, w, rm, rn, k_start, k_end, K, stride_x, stride_w, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x[rm, k_start:k_end] @ w[rn, k_start:k_end]^T, from zero, in BLOCK_K steps: (BLOCK_M,
    BLOCK_N) fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(x + rm[:, None] * stride_x + rk[None, :], mask=k_ok[None, :], other=0.0)
        b = tl.load(w + rn[:, None] * stride_w + rk[None, :], mask=k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(x, w, bias, out, partial, M, N, K, stride_x, stride_w, k_per_split, SPLITS: tl.constexpr, RANGES_APART: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_tile = SPLITS if RANGES_APART else 1  # programs' work items per output tile
    for item in range(tl.program_id(0), tiles_m * tiles_n * per_tile, tl.num_programs(0)):
        pid_m = item % tiles_m
        pid_n = (item // tiles_m) % tiles_n
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows and columns past the end read row 0 / column 0 (in bounds) and are never stored
        rm_safe = tl.where(rm < M, rm, 0).to(tl.int64)
        rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)
        o_mask = (rm < M)[:, None] & (rn < N)[None, :]
        if RANGES_APART:  # one K range; its partial is added in order by _add_ranges_kernel
            s = item // (tiles_m * tiles_n)
            k_start = s * k_per_split
            acc = _range_dot(x, w, rm_safe, rn_safe, k_start, tl.minimum(k_start + k_per_split, K), K, stride_x, stride_w, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            at = partial + (s * M + rm_safe[:, None]) * N + rn_safe[None, :]
            tl.store(at, acc, mask=o_mask)
        else:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, SPLITS):
                k_start = s * k_per_split
                total += _range_dot(x, w, rm_safe, rn_safe, k_start, tl.minimum(k_start + k_per_split, K), K, stride_x, stride_w, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            if HAS_BIAS:
                total += tl.load(bias + rn_safe).to(tl.float32)[None, :]
            at = out + rm_safe[:, None] * N + rn_safe[None, :]
            tl.store(at, total.to(out.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["M"])
def _add_ranges_kernel(partial, bias, out, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """out = sum over s of partial[s] (in order, from zero) + bias: what one program of
    _matmul_kernel adds up in registers."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        total += tl.load(partial + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, total.to(out.dtype.element_ty), mask=mask)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T (+ bias) -> (M, N) in x's dtype."""
    x, weight = x.contiguous(), weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    programs = num_programs(x.device)
    splits = k_splits(n, k, programs)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BLOCK_K) * BLOCK_K
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N)
    apart = splits > 1 and tiles < programs  # the same sums either way (module docstring)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if apart else out
    has_bias = bias is not None
    _matmul_kernel[(min(programs, tiles * (splits if apart else 1)),)](
        x, weight, bias if has_bias else x, out, partial, m, n, k, x.stride(0), weight.stride(0),
        k_per_split, SPLITS=splits, RANGES_APART=apart, HAS_BIAS=has_bias,
        IEEE=x.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if apart:
        block = 1024
        _add_ranges_kernel[(triton.cdiv(m * n, block),)](
            partial, bias if has_bias else x, out, m, n, SPLITS=splits, HAS_BIAS=has_bias,
            BLOCK=block,
        )  # fmt: skip
    return out
