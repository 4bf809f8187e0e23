"""Programmatic dependent launch (PDL, Hopper and newer) for deterministic mode's Triton kernels.

A kernel launched with PDL may start while the kernel ahead of it in the stream still runs. The
rule that keeps this safe: such a kernel makes no global load or store before `pdl_start`, which
waits until every kernel ahead has finished and its writes are visible, then lets the kernel
behind it start in turn (which waits the same way). Only L2 prefetches of weights, which never
change during a forward, may come before it (`prefetch_l2`). PDL changes when a kernel starts,
never what it computes.

Launches of more than PDL_MAX_ROWS rows go without it: on an H100 it slowed the decode step at
batch 256, where the grids fill the GPU (docs/benchmarks-log.md).
"""

from __future__ import annotations

import functools

import torch

from pipeserve.env import switches

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without grid dependency control: no PDL
    gdc_wait = gdc_launch_dependents = None

PDL_MAX_ROWS = 64
PREFETCH_MAX_BYTES = 16 << 20  # a launch's weight prefetch at most: about what HBM delivers
# during a few microseconds of the kernel ahead, and a third of an H100's L2


@functools.cache
def _pdl_on(device: torch.device) -> bool:
    return (
        gdc_wait is not None
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device)[0] >= 9
        and switches().pdl
    )


def launch_pdl(x: torch.Tensor) -> bool:
    """Whether a kernel over x's rows (dim 0) launches with PDL: on NVIDIA Hopper or newer, up to
    PDL_MAX_ROWS rows, unless PIPESERVE_PDL=0."""
    return x.is_cuda and x.shape[0] <= PDL_MAX_ROWS and _pdl_on(x.device)


def pdl_options(x: torch.Tensor, wanted: bool = True) -> dict[str, bool]:
    """A kernel's launch options for PDL: its PDL constexpr (for `pdl_start`) and Triton's
    `launch_pdl`, always equal."""
    on = wanted and launch_pdl(x)
    return {"PDL": on, "launch_pdl": on}


def projection_options(x: torch.Tensor, weight: torch.Tensor, k_range: int) -> dict:
    """A projection's launch options: `pdl_options` of x, and the weight prefetch
    (`prefetch_l2`), on where PDL is and PIPESERVE_WEIGHT_PREFETCH=1: the first `prefetch_k`
    columns of each of its K ranges (`k_range` wide), so that the whole launch asks for at most
    PREFETCH_MAX_BYTES, in lines of LINE elements (128 bytes)."""
    options = pdl_options(x)
    line = 128 // weight.element_size()
    on = options["PDL"] and switches().weight_prefetch
    prefetch_k = 0
    if on:
        share = min(1.0, PREFETCH_MAX_BYTES / (weight.numel() * weight.element_size()))
        prefetch_k = max(line, int(k_range * share) // line * line)
    return options | {"PREFETCH": on, "LINE": line, "prefetch_k": prefetch_k}


if triton is not None and gdc_wait is not None:

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        """Waits for the kernels ahead (their writes visible), then lets the kernel behind start."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

elif triton is not None:  # PDL is never on (`_pdl_on`)

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        pass

else:  # CPU-only installs launch no kernel
    pdl_start = prefetch_l2 = None


if triton is not None:

    @triton.jit
    def prefetch_l2(w, row0, N, k0, k1, stride_w, BLOCK_N: tl.constexpr, LINE: tl.constexpr):
        """Asks L2 for rows [row0, row0 + BLOCK_N) of `w` (N rows), columns [k0, k1), in lines of
        LINE elements, without waiting for them. Addresses past the ends fall back to row 0 and
        column k0 (in bounds)."""
        rows = row0 + tl.arange(0, BLOCK_N)
        rows = tl.where(rows < N, rows, 0).to(tl.int64)
        for c0 in range(k0, k1, 16 * LINE):
            cols = c0 + tl.arange(0, 16) * LINE
            cols = tl.where(cols < k1, cols, k0)
            at = w + rows[:, None] * stride_w + cols[None, :]
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1]; // dummy $0", "=r,l", [at], dtype=tl.int32,
                is_pure=False, pack=1,
            )  # fmt: skip
