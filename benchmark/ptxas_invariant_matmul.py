"""Registers, spills and shared memory of deterministic mode's matmul kernels, compiled for an
H100 (sm_90a) without a GPU: Triton's own compiler and ptxas, the resource use read back with
its cuobjdump. Every tile of the table (and, with --candidates, of the sweep), each prologue
(none, the input norm with a residual, SiLU * up), the one-program-per-tile kernel with K in one
and two ranges and the kernel of ranges run apart. Arguments divisible by 16 are declared so, as
Triton's launcher specializes them at run time (the weights' strides and sizes here are).

    python benchmark/ptxas_invariant_matmul.py [--candidates]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pipeserve.model import invariant_matmul as im
from pipeserve.model.invariant_rows import FP_FUSION

TARGET = GPUTarget("cuda", 90, 32)
PROLOGUES = {"plain": (im.PLAIN, False), "norm": (im.NORM, True), "silu": (im.SILU, False)}
POINTERS = {"x": "*bf16", "w": "*bf16", "bias": "*bf16", "out": "*bf16"}
APART = {"partial": "*fp32", "counters": "*i32"}
ROWS_IN = {"res": "*bf16", "norm_w": "*bf16", "summed": "*bf16", "eps": "fp32"}
SIZES = ("M", "N", "K", "stride_x", "stride_w")
DIVISIBLE = {"N", "K", "stride_x", "stride_w", "k_per_split"}


def signature(split: bool) -> dict[str, str]:
    """The kernel's runtime arguments in order, as `_launch` passes them."""
    ints = [*SIZES, *(("splits",) if split else ()), "k_per_split"]
    return {**POINTERS, **(APART if split else {}), **ROWS_IN, **dict.fromkeys(ints, "i32")}


def usage(fn, split: bool, constants: dict, tiles: im.Tiles) -> str:
    sig = signature(split)
    names = list(sig)
    divisible = [n for n in names if sig[n].startswith("*") or n in DIVISIBLE]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    options = {"num_warps": tiles.warps, "num_stages": tiles.stages, "enable_fp_fusion": FP_FUSION}
    kernel = triton.compile(ASTSource(fn, sig, constants, attrs), target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = (re.search(rf"{key}:(\d+)", out).group(1) for key in ("REG", "STACK"))
    mma = "wgmma" if "wgmma" in kernel.asm["ptx"] else "mma.sync"
    return f"| {regs} | {stack} | {kernel.metadata.shared // 1024} | {mma} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--candidates", action="store_true", help="also the sweep's candidates")
    args = p.parse_args()
    every = {f"table row {i}": t for i, (_, _, t) in enumerate(im.TABLE)}
    if args.candidates:
        from sweep_invariant_matmul import CANDIDATES

        every.update(CANDIDATES)
    print(f"Triton {triton.__version__}, sm_90a")
    print("| tiles | prologue | kernel | registers | spill stack bytes | shared KiB | MMA |")
    print("|---|---|---|---|---|---|---|")
    for name, t in every.items():
        shape = f"{name}: {t.block_m}x{t.block_n}x{t.block_k} w{t.warps} s{t.stages}" + (
            " swap" if t.swap else ""
        )
        for prologue, (kind, residual) in PROLOGUES.items():
            constants = dict(PROLOGUE=kind, HAS_RESIDUAL=residual, HAS_BIAS=False, SWAP=t.swap,
                             IEEE=False, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k)  # fmt: skip
            for splits in (1, 2):
                row = usage(im._tiles_kernel, False, {**constants, "SPLITS": splits}, t)
                print(f"| {shape} | {prologue} | per tile, {splits} range(s) {row}", flush=True)
            row = usage(im._split_kernel, True, constants, t)
            print(f"| {shape} | {prologue} | ranges apart {row}", flush=True)


if __name__ == "__main__":
    main()
