"""Row prologues of deterministic mode's CUDA matmul (`invariant_matmul.py`): RMSNorm(x + residual)
and SiLU(gate) * up, computed on the fly from the matmul's input, and the RMSNorm alone (the same
bits) for batches too large to fuse.

A row's RMS must come out bitwise the same in the matmul's prologue, whatever its tile, warps and
layout, and in the norm kernel here. `tl.sum` reduces in an order that follows the layout, so the
squares are added in one order written out: lane j of 128 sums the squares at k = j mod 128 in
ascending k, then the lanes are added in pairs, (0, 1), (2, 3), ..., a fixed tree of 7 levels.
Every kernel that uses these helpers is compiled without FMA contraction (`FP_FUSION`), so a
product and a sum are rounded the same in each. The normalized value rounds as `fused.add_rmsnorm`
does (fp32, cast back, times the weight).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP_FUSION = False  # the launch option of every kernel that uses these helpers
LANES = tl.constexpr(128)  # squares summed apart, then added in a fixed tree (docstring)


@triton.jit
def _pairs(v, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """(ROWS, WIDTH) -> (ROWS, WIDTH // 2): lane 2j plus lane 2j + 1."""
    a, b = tl.split(tl.reshape(v, [ROWS, WIDTH // 2, 2]))
    return a + b


@triton.jit
def _tree_sum(v, ROWS: tl.constexpr):
    """(ROWS, 128) -> (ROWS,), in the same order under every layout."""
    v = _pairs(_pairs(_pairs(_pairs(v, ROWS, 128), ROWS, 64), ROWS, 32), ROWS, 16)
    v = _pairs(_pairs(_pairs(v, ROWS, 8), ROWS, 4), ROWS, 2)
    return tl.reshape(v, [ROWS])


@triton.jit
def rows_in(x, res, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual) at `offs`, in x's dtype."""
    v = tl.load(x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        v = v + tl.load(res + offs, mask=mask, other=0.0)
    return v


@triton.jit
def row_rstd(x, res, summed, rm, sum_ok, K, stride, eps, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """1 / RMS of rows `rm` (in bounds) of x (+ residual), (ROWS,) fp32; the rows `sum_ok` of
    x + residual are also stored into `summed`. x, res and summed share the row stride."""
    sq = tl.zeros([ROWS, LANES], dtype=tl.float32)
    for k0 in range(0, K, LANES):
        rk = k0 + tl.arange(0, LANES)
        k_ok = rk < K
        offs = rm[:, None] * stride + rk[None, :]
        v = rows_in(x, res, offs, k_ok[None, :], HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(summed + offs, v, mask=sum_ok[:, None] & k_ok[None, :])
        f = v.to(tl.float32)
        sq += f * f
    return 1.0 / tl.sqrt(_tree_sum(sq, ROWS) / K + eps)


@triton.jit
def normalize(v, rstd, norm_w):
    """norm_w * rmsnorm(v) for v (ROWS, cols), rstd (ROWS,), norm_w (cols,)."""
    return norm_w[None, :] * (v.to(tl.float32) * rstd[:, None]).to(v.dtype)


@triton.jit
def _add_rmsnorm_kernel(x, res, norm_w, out, summed, M, K, eps, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m_ok = rm < M
    rm = tl.where(m_ok, rm, 0).to(tl.int64)
    rstd = row_rstd(x, res, summed, rm, m_ok, K, K, eps, HAS_RESIDUAL, ROWS)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        offs = rm[:, None] * K + rk[None, :]
        v = rows_in(x, res, offs, k_ok[None, :], HAS_RESIDUAL)
        nw = tl.load(norm_w + rk, mask=k_ok, other=0.0)
        tl.store(out + offs, normalize(v, rstd, nw), mask=m_ok[:, None] & k_ok[None, :])


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual) for x (M, K), each row's bits those of
    the matmul's NORM prologue."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    rows = 4
    _add_rmsnorm_kernel[(triton.cdiv(m, rows),)](
        x, x if residual is None else residual.contiguous(), weight, out, summed, m, k, eps,
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_K=512, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out, summed
