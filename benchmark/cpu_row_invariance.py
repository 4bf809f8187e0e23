"""Whether a projection's rows keep their bits at any batch size on this CPU, three ways of
calling the library: `pad` (one call, rows padded to a whole number of blocks), `bmm` (one
batched call of block-row matrices) and `calls` (one call per block of rows: what deterministic
mode does, in blocks of `batch_invariant.ROW_BLOCK` rows). Each row of a batch of M rows, M from
2 to 1100, is compared with the same row computed alone, for six weight shapes, fp32 and bf16,
one and two threads. Prints a table (OK, or the first shapes and M that differ) and writes JSON.

    python benchmark/cpu_row_invariance.py --json /tmp/rows.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform

import torch
import torch.nn.functional as F

SHAPES = ((192, 64), (640, 320), (320, 1280), (4000, 96), (2048, 2048), (1536, 512))
SIZES = (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256)
SIZES += (300, 512, 1100)
ALONE = 40  # rows compared with their computation alone (and the last row of the largest M)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def padded(x: torch.Tensor, block: int) -> torch.Tensor:
    m = x.shape[0]
    return torch.cat([x, x.new_zeros(max(block, -(-m // block) * block) - m, x.shape[1])])


def pad(x, w, block):
    return F.linear(padded(x, block), w)[: len(x)]


def bmm(x, w, block):
    xx = padded(x, block).view(-1, block, x.shape[1])
    out = torch.bmm(xx, w.t().unsqueeze(0).expand(len(xx), -1, -1))
    return out.reshape(-1, w.shape[0])[: len(x)]


def calls(x, w, block):
    return torch.cat([F.linear(rows, w) for rows in padded(x, block).split(block)])[: len(x)]


def differing(f, block: int, dtype: torch.dtype, gen: torch.Generator) -> list:
    bad = []
    for n, k in SHAPES:
        w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
        x = torch.randn(max(SIZES), k, generator=gen).to(dtype)
        alone = torch.cat([f(x[i : i + 1], w, block) for i in range(ALONE)])
        ms = [m for m in SIZES if not torch.equal(f(x[:m], w, block)[:ALONE], alone[:m])]
        last = max(SIZES) - 1
        if not torch.equal(f(x, w, block)[last], f(x[last:], w, block)[0]):
            ms.append(f"last row of {max(SIZES)}")
        if ms:
            bad.append({"n": n, "k": k, "m": ms})
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--blocks", default="4,8,16,32")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{cpu_name()}, torch {torch.__version__}")
    print("| threads | dtype | way | rows per block | result |\n|---|---|---|---|---|")
    ways = {"pad": pad, "bmm": bmm, "calls": calls}
    blocks = [int(b) for b in args.blocks.split(",")]
    for threads, dtype in itertools.product((1, 2), (torch.float32, torch.bfloat16)):
        torch.set_num_threads(threads)
        for (way, f), block in itertools.product(ways.items(), blocks):
            bad = differing(f, block, dtype, gen)
            rows.append({"threads": threads, "dtype": str(dtype), "way": way, "block": block})
            rows[-1]["differ"] = bad
            text = (
                "OK" if not bad else "; ".join(f"{b['n']}x{b['k']} M={b['m'][:3]}" for b in bad[:2])
            )
            print(f"| {threads} | {str(dtype)[6:]} | {way} | {block} | {text} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "torch": torch.__version__, "rows": rows}, f)


if __name__ == "__main__":
    main()
