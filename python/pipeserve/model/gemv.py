"""One-row projections (decode at batch 1) as one Triton kernel each, on CUDA.

A batch-1 decode step only streams weights. On an H200, cuBLAS reads the 2048- to 6144-wide
projections of 1B-8B models at ~1.5-3 TB/s and the step spends a launch more on each norm and on
SiLU * up. Here each program reads BLOCK_N whole weight rows and may apply a prologue to its
input: `norm_linear` computes (x + residual) -> RMSNorm on the fly (the input norm fused into
qkv), `silu_mul_linear` SiLU(gate) * up (fused into down). The prologues round as
`fused.add_rmsnorm` and `fused.silu_and_mul` do, so only the sum's order differs from the unfused
path. Outputs wider than MAX_OUT per rank (gate_up at TP 1-2) and more rows stay with cuBLAS,
which was faster there (benchmark/bench_gemv.py, swept at TP 1).

`PIPESERVE_GEMV_MAX_ROWS` (default 1, at most 4; 0 turns this path off) bounds the rows it takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeserve.env import switches
from pipeserve.model import fused
from pipeserve.model.fused import add_rmsnorm, silu_and_mul, triton

if triton is not None:
    import triton.language as tl


MAX_OUT = 8192  # output features
NONE, NORM, SILU = 0, 1, 2  # prologues


def fits(x: torch.Tensor, weight: torch.Tensor, width: int | None = None) -> bool:
    """Whether `x` (rows, `width`: by default weight's input width) times `weight` (out, in)
    takes this path; anything else (F.linear's errors included) goes to the torch ops."""
    n, k = weight.shape
    return (
        fused._use_triton(x)
        and 0 < x.shape[0] <= switches().gemv_max_rows  # PIPESERVE_GEMV_MAX_ROWS
        and n <= MAX_OUT
        and (n + 64) * k < 2**31  # the kernel's offsets are int32
        and x.dim() == 2
        and x.shape[1] == (k if width is None else width)
        and x.dtype == weight.dtype
        and weight.is_contiguous()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias)."""
    if not fits(x, weight):
        return F.linear(x, weight, bias)
    return _launch(NONE, x.contiguous(), weight, bias)


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rmsnorm(x + residual), weight, bias), x + residual), as add_rmsnorm then linear."""
    if not fits(x, weight):
        normed, summed = add_rmsnorm(x, residual, norm_weight, eps)
        return F.linear(normed, weight, bias), summed
    x = x.contiguous()
    summed = x if residual is None else torch.empty_like(x)
    res = None if residual is None else residual.contiguous()
    out = _launch(NORM, x, weight, bias, res=res, norm_weight=norm_weight, eps=eps, summed=summed)
    return out, summed


def silu_mul_linear(gate_up: torch.Tensor, inter: int, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(silu(gate) * up, weight) for gate_up (rows, 2 * inter)."""
    if inter != weight.shape[1] or not fits(gate_up, weight, 2 * inter):
        return F.linear(silu_and_mul(gate_up, inter), weight)
    return _launch(SILU, gate_up.contiguous(), weight, None)


def norm_gate_up(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's first half: (gate_up, x + residual); SiLU * up runs in `down_linear`."""
    return norm_linear(x, residual, norm_weight, eps, weight, bias)


def down_linear(gate_up: torch.Tensor, inter: int, weight: torch.Tensor) -> torch.Tensor:
    """The MLP's second half, of `norm_gate_up`'s gate_up."""
    return silu_mul_linear(gate_up, inter, weight)


def _launch(prologue, x, weight, bias, res=None, norm_weight=None, eps=0.0, summed=None, blocks=None):  # fmt: skip
    m, (n, k) = x.shape[0], weight.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = triton.next_power_of_2(m)
    block_n, block_k = blocks or choose_blocks(n, k, block_m)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, x if res is None else res, weight if norm_weight is None else norm_weight, weight,
        weight if bias is None else bias, out, x if summed is None else summed, m, n, k, eps,
        PROLOGUE=prologue, HAS_RESIDUAL=res is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def choose_blocks(n: int, k: int, block_m: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K), from the sweep of bench_gemv.py on an H200 (1B and 8B shapes, one
    row): 1024-wide K blocks, about N / 1024 rows per program; 8192 weights per step of the long
    down projections (K >= 8192)."""
    if k >= 8192:
        block_n = min(8, max(2, triton.next_power_of_2(n // 512)))
        return block_n, max(128, 8192 // (block_n * block_m))
    block_n = min(8, max(2, triton.next_power_of_2(-(-n // 1024))))
    return block_n, max(128, 1024 // block_m)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x, res, norm_w, w, bias, out, summed, M, N, K, eps, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # x (M, K), or (M, 2K) for SILU; w (N, K); out (M, N); all contiguous
        pid = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        x_width = 2 * K if PROLOGUE == 2 else K
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if PROLOGUE == 1:  # the rows' RMS first; program 0 also writes x + residual
            sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mask = m_ok[:, None] & (rk < K)[None, :]
                offs = rm[:, None] * K + rk[None, :]
                v = tl.load(x + offs, mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    v = v + tl.load(res + offs, mask=mask, other=0.0)
                    if pid == 0:
                        tl.store(summed + offs, v, mask=mask)
                f = v.to(tl.float32)
                sq += f * f
            rstd = 1.0 / tl.sqrt(tl.sum(sq, 1) / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            mask = m_ok[:, None] & k_ok[None, :]
            offs = rm[:, None] * x_width + rk[None, :]
            a = tl.load(x + offs, mask=mask, other=0.0)
            if PROLOGUE == 1:
                if HAS_RESIDUAL:
                    a = a + tl.load(res + offs, mask=mask, other=0.0)
                nw = tl.load(norm_w + rk, mask=k_ok, other=0.0)
                a = nw[None, :] * (a.to(tl.float32) * rstd[:, None]).to(a.dtype)
            if PROLOGUE == 2:
                up = tl.load(x + offs + K, mask=mask, other=0.0)
                g = a.to(tl.float32)
                a = (g / (1.0 + tl.exp(-g))).to(up.dtype) * up
            w_mask = n_ok[:, None] & k_ok[None, :]
            wt = tl.load(w + rn[:, None] * K + rk[None, :], mask=w_mask, other=0.0)
            acc += a.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :]
        y = tl.sum(acc, 2)  # (BLOCK_M, BLOCK_N)
        if HAS_BIAS:
            y += tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o_mask = m_ok[:, None] & n_ok[None, :]
        tl.store(out + rm[:, None] * N + rn[None, :], y.to(out.dtype.element_ty), mask=o_mask)
