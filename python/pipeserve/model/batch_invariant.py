"""Batch-invariant projections for deterministic mode (`--deterministic`): a row's result depends
on that row alone, never on how many rows share the call or what they hold.

The same three entry points as `gemv` (the default path), so a layer picks one module or the other
in its constructor and its forward never asks again.

CPU. MKL's sgemm picks its kernel by the row count: one row runs a GEMV, two or three rows a
small-M kernel, blocks of four rows the blocked GEMM, and the three reduce a row's dot products in
different orders. With several threads the rows are shared out in blocks of four, and a thread
left with a partial block takes the small-M kernel again (measured on this build: M = 5 at two
threads reduces row 4 differently from row 0). So every projection runs on whole blocks of
ROW_BLOCK rows, the last padded with zero rows: then every row, at any M, any thread count (1-4
measured) and any place in the batch, is reduced by the one blocked kernel, bitwise the same
(fp32 and bf16, M up to 1100). `test/test_deterministic.py` checks the premise where it runs.
SiLU runs as exp, add and divide: torch's fused SiLU (and sigmoid) rounds the elements of a
vector's scalar tail differently from the vectorised body, so an element's value would depend on
where the batch ends.

CUDA. A persistent Triton matmul with one K order for every M and tiles chosen by M
(`invariant_matmul.py`); the one-row GEMV kernels are bypassed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeserve.model.fused import add_rmsnorm, silu_and_mul

ROW_BLOCK = 4  # MKL's row block (measured; see the module docstring)


def pad_rows(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`x` with zero rows appended along `dim` up to a whole number of ROW_BLOCKs (at least one)."""
    m = x.shape[dim]
    missing = max(ROW_BLOCK, -(-m // ROW_BLOCK) * ROW_BLOCK) - m
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def matmul_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T (+ bias), each row reduced in one fixed order."""
    if x.is_cuda:
        from pipeserve.model.invariant_matmul import matmul

        return matmul(x, weight, bias)
    return F.linear(pad_rows(x), weight, bias)[: x.shape[0]]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K)."""
    shape = x.shape
    out = matmul_rows(x.reshape(-1, shape[-1]), weight, bias)
    return out.view(*shape[:-1], weight.shape[0])


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rmsnorm(x + residual)), x + residual); the norm reduces each row on its own."""
    normed, summed = add_rmsnorm(x, residual, norm_weight, eps)
    return linear(normed, weight, bias), summed


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """silu(gate) * up of gate_up (N, 2 * inter), each element rounded the same wherever it sits:
    SiLU in fp32 from exp, cast back, then times up (as the fused CUDA kernel rounds)."""
    if gate_up.is_cuda:
        return silu_and_mul(gate_up, inter)  # one program per element block: no tail path
    gate, up = gate_up.split(inter, dim=-1)
    g = gate.float()
    return (g / (1.0 + torch.exp(-g))).to(gate.dtype) * up


def silu_mul_linear(gate_up: torch.Tensor, inter: int, weight: torch.Tensor) -> torch.Tensor:
    """linear(silu(gate) * up, weight)."""
    return linear(silu_mul(gate_up, inter), weight)
