"""Compiles deterministic mode's plain matmul kernel (`invariant_matmul._plain_kernel`, TMA loads)
for sm_90a without a GPU and prints ptxas's register, spill and shared-memory use per candidate
tile, with and without the glu epilogue, K in one range and in four, launched with PDL (with
the weight prefetch under PIPESERVE_WEIGHT_PREFETCH=1). Run it with the device's
Triton (3.6 on the GPU hosts) ahead of a device call: a tile that spills or wants more than the
227 KB of shared memory an H100 block may have is not worth the device's time.

    pip download triton==3.6.0 --no-deps -d /tmp/tr36
    pip install --no-deps --target /tmp/tr36site /tmp/tr36/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/tr36site:python python benchmark/ptxas_invariant_matmul.py [names]
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pipeserve.model import invariant_matmul as im
from sweep_invariant_matmul import CANDIDATES

SMEM_LIMIT = 227 * 1024  # per block on an H100
PREFETCH = os.environ.get("PIPESERVE_WEIGHT_PREFETCH") == "1"  # compile the weight prefetch in


def compile_tile(t: im.Tiles, glu: bool, splits: int) -> tuple[str, int]:
    """(ptxas -v's summary, shared bytes) of the plain kernel for tile `t`."""
    fn = im._plain_kernel
    params = list(inspect.signature(fn.fn).parameters)
    block_n = im.plain_block_n(t, glu)
    sig = {"x": f"tensordesc<bf16[{t.block_m},{t.block_k}]>"}
    sig |= {"w": f"tensordesc<bf16[{block_n},{t.block_k}]>", "w_ptr": "*bf16", "bias": "*bf16"}
    sig |= {"out": f"tensordesc<bf16[{t.block_m},{block_n}]>"}
    sig |= {a: "i32" for a in ("M", "N", "K", "stride_x", "stride_w", "k_per_split", "prefetch_k")}
    const = dict(SPLITS=splits, TMA=True, GLU=glu, HAS_BIAS=False, SWAP=t.swap, IEEE=False)
    const |= dict(BLOCK_M=t.block_m, BLOCK_N=block_n, BLOCK_K=t.block_k)
    const |= dict(PDL=True, PREFETCH=PREFETCH, LINE=64)  # as a decode step launches it
    sig |= {c: "constexpr" for c in const}
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(params.index(c),): v for c, v in const.items()}
    )
    options = {"num_warps": t.warps, "num_stages": t.stages, "launch_pdl": True}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(kernel.asm["ptx"])
        cmd = [ptxas, "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"]
        err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    return (
        f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} B spilled",
        kernel.metadata.shared,
    )


def main() -> None:
    args = sys.argv[1:]
    only = args[0].split(",") if args else None  # candidate names
    print(f"triton {triton.__version__}, sm_90a")
    print("| tile | glu | K ranges | ptxas | shared KB |\n|---|---|---|---|---|")
    for name, t in CANDIDATES.items():
        if not (t.plain and t.tma) or (only and name not in only):
            continue
        for glu in (False, True):
            for splits in (1, 4):
                info, smem = compile_tile(t, glu, splits)
                over = " (over the limit)" if smem > SMEM_LIMIT else ""
                print(f"| {name} | {glu} | {splits} | {info} | {smem // 1024}{over} |", flush=True)


if __name__ == "__main__":
    main()
