"""Small-batch projections on one GPU: `pipeserve.model.gemv` (norm or SiLU * up fused in) against
the unfused ops (Triton norm / SiLU * up, then cuBLAS), on the 1B and 8B projection shapes, for 1,
2 and 4 rows; a sweep of block sizes beside the one `gemv.choose_blocks` picks.

    python benchmark/bench_gemv.py --json /tmp/gemv.json

Each variant is timed as 50 launches inside one CUDA graph (device time, no Python launch cost).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from pipeserve.model import gemv
from pipeserve.model.fused import add_rmsnorm, silu_and_mul

# (name, prologue, N, K): qkv and gate_up take the norm, down takes SiLU * up
SHAPES = {
    "1b": [("qkv", gemv.NORM, 3072, 2048), ("o", gemv.NONE, 2048, 2048),
           ("gate_up", gemv.NORM, 16384, 2048), ("down", gemv.SILU, 2048, 8192)],
    "8b": [("qkv", gemv.NORM, 6144, 4096), ("o", gemv.NONE, 4096, 4096),
           ("gate_up", gemv.NORM, 28672, 4096), ("down", gemv.SILU, 4096, 14336)],
}  # fmt: skip
GRID = [(bn, bk) for bn in (1, 2, 4, 8, 16) for bk in (128, 256, 512, 1024, 2048)]


def graph_us(fn, reps: int = 50) -> float:
    """Device microseconds of fn(i), i = 0..reps-1, captured in one graph and replayed."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def variants(prologue: int, m: int, n: int, k: int):
    """(unfused(i), fused(i, blocks)) on random bf16 inputs; i picks one of enough weight copies
    that together they overflow the L2 cache (each launch reads its weight from memory)."""
    dev, dt = "cuda", torch.bfloat16
    copies = -(-(256 << 20) // (n * k * 2))
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
    x, res = (torch.randn(m, k, device=dev, dtype=dt) for _ in range(2))
    norm_w = torch.ones(k, device=dev, dtype=dt)
    gate_up = torch.randn(m, 2 * k, device=dev, dtype=dt)

    def w(i: int) -> torch.Tensor:
        return ws[i % copies]

    if prologue == gemv.NORM:
        summed = torch.empty_like(x)
        return (
            lambda i: F.linear(add_rmsnorm(x, res, norm_w, 1e-5)[0], w(i)),
            lambda i, b: gemv._launch(gemv.NORM, x, w(i), None, res, norm_w, 1e-5, summed, b),
        )
    if prologue == gemv.SILU:
        return (
            lambda i: F.linear(silu_and_mul(gate_up, k), w(i)),
            lambda i, b: gemv._launch(gemv.SILU, gate_up, w(i), None, blocks=b),
        )
    return (
        lambda i: F.linear(x, w(i)),
        lambda i, b: gemv._launch(gemv.NONE, x, w(i), None, blocks=b),
    )


def measure(shape: str, name: str, prologue: int, m: int, n: int, k: int) -> dict:
    unfused, fused_fn = variants(prologue, m, n, k)
    block_m = 1 << (m - 1).bit_length()
    chosen = gemv.choose_blocks(n, k, block_m)
    grid = [b for b in GRID if 2048 <= b[0] * b[1] * block_m <= 8192]
    sweep = {b: graph_us(lambda i, b=b: fused_fn(i, b)) for b in {*grid, chosen}}
    best = min(sweep, key=sweep.get)
    return {
        "shape": shape, "proj": name, "rows": m, "n": n, "k": k,
        "unfused_us": graph_us(unfused), "chosen": chosen, "chosen_us": sweep[chosen],
        "best": best, "best_us": sweep[best],
        "sweep": {f"{a}x{b}": t for (a, b), t in sorted(sweep.items())},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    print(f"{'shape':>5} {'proj':>8} {'M':>2} {'unfused us':>10} {'chosen us':>9} {'blocks':>10} "
          f"{'best us':>8} {'best':>10} {'TB/s best':>9}")  # fmt: skip
    for shape in args.shapes.split(","):
        for name, prologue, n, k in SHAPES[shape]:
            for m in (int(r) for r in args.rows.split(",")):
                row = measure(shape, name, prologue, m, n, k)
                rows.append(row)
                tbs = n * k * 2 / row["best_us"] / 1e6
                print(f"{shape:>5} {name:>8} {m:>2} {row['unfused_us']:>10.1f} "
                      f"{row['chosen_us']:>9.1f} {row['chosen']!s:>10} {row['best_us']:>8.1f} "
                      f"{row['best']!s:>10} {tbs:>9.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
