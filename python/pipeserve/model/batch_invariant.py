"""Batch-invariant projections for deterministic mode (`--deterministic`): a row's result depends
on that row alone, never on how many rows share the call or what they hold.

The same entry points as `gemv` (the default path), so a layer picks one module or the other
in its constructor and its forward never asks again.

CPU. The library picks its kernel by the call's shape and thread count, and its kernels reduce
a row's dot products in different orders. Measured: on an AMD EPYC, MKL's sgemm ran one row as a
GEMV, two or three rows in a small-M kernel and blocks of four in the blocked GEMM; on an Intel
Xeon (AVX-512) fp32 changed kernel again at 9-15 rows and, at two threads, past 255, and bf16
(oneDNN) at 33 to 65 rows; batched matmuls changed with the batch count at two threads. So every
projection is computed in calls of exactly ROW_BLOCK rows, the last padded with zero rows: the
library sees one shape, and a row's bits depend on the row alone (on the Intel machine: fp32
and bf16, one and two threads, calls of 4 to 32 rows, M up to 1100, six weight shapes; 4 rows
decode fastest there, 16 prefill fastest). `test/test_deterministic.py` checks the premise where
it runs. The attention's matmuls (`attention/torch_invariant.py`) pad their rows to ROW_BLOCK in
one batched call; their tests pass on both machines.
SiLU runs as exp, add and divide: torch's fused SiLU (and sigmoid) rounds the elements of a
vector's scalar tail differently from the vectorised body, so an element's value would depend on
where the batch ends.

CUDA. A persistent Triton matmul with one K order for every M and tiles chosen by M
(`invariant_matmul.py`); the one-row GEMV kernels are bypassed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeserve.model.fused import add_rmsnorm

ROW_BLOCK = 4  # rows per library call (see the module docstring)


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
    calls = [F.linear(rows, weight, bias) for rows in pad_rows(x).split(ROW_BLOCK)]
    return torch.cat(calls)[: x.shape[0]]


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
    normed, summed = add_rmsnorm(x, residual, norm_weight, eps, pdl=True)
    return linear(normed, weight, bias), summed


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """silu(gate) * up of gate_up (N, 2 * inter) on CPU, each element rounded the same wherever it
    sits: SiLU in fp32 from exp, cast back, then times up (as `fused.silu_and_mul` rounds; on CUDA
    `norm_gate_up` takes it from the matmul)."""
    gate, up = gate_up.split(inter, dim=-1)
    g = gate.float()
    return (g / (1.0 + torch.exp(-g))).to(gate.dtype) * up


def norm_gate_up(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's first half: (silu(gate) * up of linear(rmsnorm(x + residual)), x + residual).
    On CUDA, SiLU * up runs in the matmul's epilogue where its tiles allow (the same bits as
    after it)."""
    normed, summed = add_rmsnorm(x, residual, norm_weight, eps, pdl=True)
    if x.is_cuda:
        from pipeserve.model.invariant_matmul import matmul

        return matmul(normed, weight, bias, glu=True), summed
    return silu_mul(linear(normed, weight, bias), inter), summed


def down_linear(hidden: torch.Tensor, inter: int, weight: torch.Tensor) -> torch.Tensor:
    """The MLP's second half, of `norm_gate_up`'s hidden."""
    return linear(hidden, weight)
