"""Checks shared by the deterministic-mode tests: one probe request's attention, computed in
every way a serving engine may compute it, must come out bitwise the same."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipeserve.model.attention import BackendSpec, create_backend
from pipeserve.model.forward_batch import ForwardBatch
from pipeserve.model.fused import store_kv

D = 16
ROWS, CTX, SLOTS = 16, 320, 8192
CPU = torch.device("cpu")


class AttentionWorld:
    """A slot pool with fixed q/k/v per (request, position): a request's outputs at a position
    depend only on those, however its tokens are grouped into forwards."""

    def __init__(
        self, backend: str, dtype: torch.dtype, heads: tuple[int, int], device: torch.device
    ) -> None:
        self.backend, self.dtype, self.device = backend, dtype, device
        h, hkv = heads
        gen = torch.Generator().manual_seed(0)
        self.q = torch.randn(ROWS, CTX, h, D, generator=gen).to(device, dtype)
        self.k = torch.randn(ROWS, CTX, hkv, D, generator=gen).to(device, dtype)
        self.v = torch.randn(ROWS, CTX, hkv, D, generator=gen).to(device, dtype)
        slots = torch.randperm(SLOTS - 1, generator=gen)[: ROWS * CTX] + 1  # slot 0: padding
        self.host_table = slots.view(ROWS, CTX).to(torch.int32)
        self.table = self.host_table.to(device)
        self.k_cache = torch.zeros(SLOTS, hkv, D, dtype=dtype, device=device)
        self.v_cache = torch.zeros(SLOTS, hkv, D, dtype=dtype, device=device)
        spec = BackendSpec(h, hkv, D, max_batch=ROWS, device=device)
        self.attention = create_backend(backend, spec, self.table)

    def step(self, parts: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One forward of (request, prefix, new tokens) parts, in that order in the batch; the
        parts' outputs (n, H, D)."""
        reqs, prefix, extend = ([p[i] for p in parts] for i in range(3))
        out_slots = [int(self.host_table[r, p + j]) for r, p, n in parts for j in range(n)]
        fb = ForwardBatch.build(reqs, prefix, extend, out_slots, self.device)
        q, k, v = (
            torch.cat([t[r, p : p + n] for r, p, n in parts]) for t in (self.q, self.k, self.v)
        )
        store_kv(k, v, self.k_cache, self.v_cache, fb.out_slots)
        self.attention.prepare_metadata(fb)
        out = self.attention.forward(q, k, v, (self.k_cache, self.v_cache), fb, D**-0.5)
        return list(out.split(extend))


def probe_runs(
    backend: str,
    dtype: torch.dtype,
    heads: tuple[int, int],
    length: int,
    rng: np.random.Generator,
    device: torch.device = CPU,
    ways: tuple[str, ...] = ("whole", "chunks", "decode", "mixed"),
) -> list[torch.Tensor]:
    """The probe (request 0, `length` tokens; `heads`: query and KV heads) computed: whole, in
    random chunks, one token at a time, and in random batches of other requests' decodes and
    extends (the probe at a random place in each). Returns each way's (length, H, D) output."""
    runs = []
    for way in ways:
        world, done, outs = AttentionWorld(backend, dtype, heads, device), 0, []
        others = {r: 0 for r in range(1, ROWS)}
        while done < length:
            if way == "whole":
                n = length
            elif way == "decode":
                n = 1
            else:
                n = int(min(length - done, rng.integers(1, 40)))
            parts = [(0, done, n)]
            if way == "mixed":
                for r in rng.choice(list(others), size=int(rng.integers(0, 12)), replace=False):
                    m = int(min(CTX - others[r], rng.choice([1, 1, 1, int(rng.integers(2, 30))])))
                    if m:
                        parts.append((int(r), others[r], m))
                        others[r] += m
                rng.shuffle(parts)
            outs.append(dict(zip([p[0] for p in parts], world.step(parts), strict=True))[0])
            done += n
        runs.append(torch.cat(outs))
    return runs


MMA_K = 16  # the K of one bf16 MMA instruction


@contextlib.contextmanager
def row_exact_interpreter_dot():
    """Triton's interpreter computes `tl.dot` with numpy's BLAS, whose result for a row depends on
    the row's place in the tile (OpenBLAS 0.3.31: 10 of 16 rows of a 16x16 @ 16x64 differ when
    moved), unlike a GPU's MMA, whose every output element is the same sequence of steps. Inside
    this context the interpreter multiplies tiles with one sequential sum per element and MMA
    step of MMA_K (bf16 operands widened exactly to fp32), the steps added to the accumulator in
    turn as the MMA adds them, so that a kernel's batch invariance, under any BLOCK_K, is
    testable on CPU."""
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widened(h) -> np.ndarray:
        if h.data.dtype == np.uint16:  # the interpreter keeps bf16 as its bits
            return (h.data.astype(np.uint32) << 16).view(np.float32)
        return h.data.astype(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        wa, wb, acc = widened(a), widened(b), d.data
        for k0 in range(0, wa.shape[1], MMA_K):  # each MMA step's sum, added in turn
            step = np.einsum(
                "ik,kj->ij", wa[:, k0 : k0 + MMA_K], wb[k0 : k0 + MMA_K], optimize=False
            )
            acc = acc + step.astype(acc.dtype)
        return interpreter.TensorHandle(acc, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = original
