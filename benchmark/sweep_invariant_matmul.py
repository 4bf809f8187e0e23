"""Tile shapes for deterministic mode's matmul (`model/invariant_matmul.py`), chosen from data: for
each projection of the 1B and 8B shapes, every candidate `Tiles` is checked bitwise against the
REFERENCE tiles (every row at M = 1..300, and a row alone) and timed at M = 1, 32, 256 and 2048
(a prefill chunk; not for lm_head, which sees a prompt's last token alone) under each K split,
beside what the default engine runs there (the one-row GEMV at M = 1, cuBLAS).

    python benchmark/sweep_invariant_matmul.py --shapes 1b,8b --json /tmp/sweep.json

Times are device microseconds per call: a CUDA graph of --calls calls, replayed, median of
--replays. Only candidates whose rows all match may share a table (a mismatch is printed).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from pipeserve.model import gemv
from pipeserve.model import invariant_matmul as im
from pipeserve.model.fused import silu_and_mul
from pipeserve.model.invariant_matmul import Tiles
from random_checkpoint import SHAPES

CANDIDATES = {
    "ref": im.REFERENCE,
    # the persistent kernel (`_matmul_kernel`): rows as the MMA's M side spill at 255 registers
    # (ptxas -v, sm_90a) and ran 1.5-3x slower than the swapped tiles at every M on an H100;
    # 64x64 stays as a check of equality
    "64x64w4": Tiles(64, 64, 64, 4, 4, per_sm=2),
    "swap32x128": Tiles(32, 128, 64, 4, 4, swap=True, per_sm=2),
    "swap32x64": Tiles(32, 64, 64, 4, 4, swap=True, per_sm=2),
    "swap16x64": Tiles(16, 64, 64, 4, 4, swap=True, per_sm=4),
    "swap16x64k128": Tiles(16, 64, 128, 4, 3, swap=True, per_sm=4),
    "swap16x128": Tiles(16, 128, 64, 4, 4, swap=True, per_sm=2),
    "mma16x64": Tiles(16, 64, 64, 4, 4, per_sm=4),  # BLOCK_M 16: mma.sync, not wgmma
    # one program per tile (`_plain_kernel`), loads through tensor descriptors (TMA)
    "tma128x128w8": Tiles(128, 128, 64, 8, 3, plain=True, tma=True),
    "tma128x128w4s4": Tiles(128, 128, 64, 4, 4, plain=True, tma=True),
    "tma128x256w8": Tiles(128, 256, 64, 8, 3, plain=True, tma=True),
    "tma64x128w4": Tiles(64, 128, 64, 4, 4, plain=True, tma=True),
    "tma64x256w8": Tiles(64, 256, 64, 8, 3, plain=True, tma=True),
    "tmaswap64x128w4": Tiles(64, 128, 64, 4, 4, swap=True, plain=True, tma=True),
    # many batch rows on the MMA's narrow side: each weight tile is read by fewer programs (at
    # M = 256, 32-row tiles read the weights 8 times from L2)
    "tmaswap64x64w4": Tiles(64, 64, 64, 4, 4, swap=True, plain=True, tma=True),
    "tmaswap128x64w4": Tiles(128, 64, 64, 4, 4, swap=True, plain=True, tma=True),
    "tmaswap128x128w4": Tiles(128, 128, 64, 4, 3, swap=True, plain=True, tma=True),
    "tmaswap128x128w8": Tiles(128, 128, 64, 8, 3, swap=True, plain=True, tma=True),
    "tmaswap256x64w4": Tiles(256, 64, 64, 4, 3, swap=True, plain=True, tma=True),
    "tmaswap256x128w8": Tiles(256, 128, 64, 8, 3, swap=True, plain=True, tma=True),
    "tmaswap32x128": Tiles(32, 128, 64, 4, 4, swap=True, plain=True, tma=True),
    "tmaswap16x128": Tiles(16, 128, 64, 4, 4, swap=True, plain=True, tma=True),
    "tmaswap16x64": Tiles(16, 64, 64, 4, 4, swap=True, plain=True, tma=True),
    "tmaswap16x64k128": Tiles(16, 64, 128, 4, 3, swap=True, plain=True, tma=True),
    "tmaswap16x32w2": Tiles(16, 32, 128, 2, 4, swap=True, plain=True, tma=True),
    # a decode step's few rows over narrow projections: more programs, more bytes in flight each
    "tmaswap16x16w1": Tiles(16, 16, 128, 1, 4, swap=True, plain=True, tma=True),
    "tmaswap16x32k256w2": Tiles(16, 32, 256, 2, 3, swap=True, plain=True, tma=True),
    # deeper pipelines for the narrow ones (qkv, o: 64-96 programs each streaming all of K)
    "tmaswap16x32k256w2s4": Tiles(16, 32, 256, 2, 4, swap=True, plain=True, tma=True),
    "tmaswap16x32w2s6": Tiles(16, 32, 128, 2, 6, swap=True, plain=True, tma=True),
    "tmaswap16x16k256w1s4": Tiles(16, 16, 256, 1, 4, swap=True, plain=True, tma=True),
    "swap16x32w2": Tiles(16, 32, 128, 2, 4, swap=True, per_sm=4),  # ranges apart when split
    # the same kernel with pointer loads
    "plain128x128w8": Tiles(128, 128, 64, 8, 3, plain=True),
    "plainswap16x64": Tiles(16, 64, 64, 4, 4, swap=True, plain=True),
}
SIZES = (1, 32, 256, 2048)
HEAD_SIZES = (1, 32, 256)  # lm_head: decode batches


def layer_shapes(name: str) -> dict[str, tuple[int, int]]:
    s = SHAPES[name]
    h, d = s["hidden"], s["hidden"] // s["heads"]
    return {
        "qkv": ((s["heads"] + 2 * s["kv"]) * d, h),
        "o": (h, h),
        "gate_up": (2 * s["inter"], h),
        "down": (h, s["inter"]),
        "lm_head": (s["vocab"], h),
    }


def graph_us(fn, calls: int, replays: int) -> float:
    fn()
    torch.cuda.synchronize()  # the matmul's split counters take one launch at a time
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def mismatches(x, w, tiles: Tiles, splits: int, ref: torch.Tensor, sizes) -> list[int]:
    bad = [m for m in sizes if not torch.equal(im.matmul(x[:m], w, None, tiles, splits), ref[:m])]
    if not torch.equal(im.matmul(x[7:8], w, None, tiles, splits), ref[7:8]):
        bad.append(-7)  # row 7 alone
    return bad


def sweep_layer(shape: str, layer: str, n: int, k: int, args) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).bfloat16()
    sizes = HEAD_SIZES if layer == "lm_head" else SIZES
    x = torch.randn(max(300, *sizes), k, generator=gen, device="cuda").bfloat16()
    rule = im.k_splits(n, k, im.num_sms(x.device))
    base = {"shape": shape, "layer": layer, "n": n, "k": k, "rule_splits": rule}
    cublas = {
        f"us{m}": graph_us(lambda m=m: F.linear(x[:m], w), args.calls, args.replays) for m in sizes
    }
    gemv_us = graph_us(lambda: gemv.linear(x[:1], w), args.calls, args.replays)
    rows = [{**base, "what": "cublas", **cublas}, {**base, "what": "default", "us1": gemv_us}]
    tried = {1, rule, rule // 2, rule * 2}
    if args.splits:
        tried = set(args.splits)
    tried &= {s for s in (1, 2, 4, 8, 16) if k >= s * im.K_GRANULE}
    if args.rule_only:
        tried = set()
    for splits in sorted(tried | {rule}):
        ref = im.matmul(x, w, None, im.REFERENCE, splits)
        every = range(1, 301) if splits in (1, rule) else (1, 2, 17, 32, 64, 65, 129, 256, 300)
        every = [*every, *(m for m in sizes if m > 300)]
        for name, tiles in ((c, CANDIDATES[c]) for c in args.candidates):
            row = {**base, "what": name, "splits": splits}
            row["mismatch_m"] = mismatches(x, w, tiles, splits, ref, every)
            for m in sizes:
                fn = lambda m=m, t=tiles, s=splits: im.matmul(x[:m], w, None, t, s)  # noqa: E731
                row[f"us{m}"] = graph_us(fn, args.calls, args.replays)
            rows.append(row)
            if row["mismatch_m"]:
                print("MISMATCH", json.dumps(row), flush=True)
    if layer == "gate_up":
        rows += sweep_glu(x, w, sizes, base, args)
    return rows


def sweep_glu(x, w, sizes, base: dict, args) -> list[dict]:
    """gate_up with silu(gate) * up after it: cuBLAS and the silu kernel (the default at M > 1),
    each candidate's `matmul(glu=True)` (plain tiles: in the epilogue), checked bitwise against
    the REFERENCE product followed by the silu kernel."""
    inter = w.shape[0] // 2
    ref = silu_and_mul(im.matmul(x, w, None, im.REFERENCE), inter)
    fn = lambda m: silu_and_mul(F.linear(x[:m], w), inter)  # noqa: E731
    rows = [{**base, "what": "cublas+silu", **{f"us{m}": graph_us(lambda m=m: fn(m), args.calls, args.replays) for m in sizes}}]  # fmt: skip
    for name, tiles in ((c, CANDIDATES[c]) for c in args.candidates):
        glu = lambda m, t=tiles: im.matmul(x[:m], w, None, t, glu=True)  # noqa: E731
        row = {**base, "what": name + "+glu", "splits": base["rule_splits"]}
        every = (1, 2, 5, 16, 17, 32, 64, 65, 129, 256, 300, *(m for m in sizes if m > 300))
        row["mismatch_m"] = [m for m in every if not torch.equal(glu(m), ref[:m])]
        for m in sizes:
            row[f"us{m}"] = graph_us(lambda m=m, g=glu: g(m), args.calls, args.replays)
        rows.append(row)
        if row["mismatch_m"]:
            print("MISMATCH", json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict]) -> None:
    """Per layer and M: the baselines and the five fastest candidates whose rows all match."""
    layers = {(r["shape"], r["layer"]) for r in rows}
    for shape, layer in sorted(layers):
        mine = [r for r in rows if (r["shape"], r["layer"]) == (shape, layer)]
        cublas = next(r for r in mine if r["what"] == "cublas")
        default = next(r for r in mine if r["what"] == "default")
        ok = [r for r in mine if "splits" in r and not r["mismatch_m"]]
        print(f"\n{shape} {layer} N={mine[0]['n']} K={mine[0]['k']} rule={mine[0]['rule_splits']}")
        for m in (m for m in SIZES if f"us{m}" in cublas):
            best = sorted(ok, key=lambda r: r[f"us{m}"])[:5]
            line = ", ".join(f"{r['what']}/s{r['splits']} {r[f'us{m}']:.1f}" for r in best)
            base = f"cublas {cublas[f'us{m}']:.1f}" + (
                f" gemv {default['us1']:.1f}" if m == 1 else ""
            )
            print(f"  M={m:<4} {base} | {line}")
    for name in {r["what"] for r in rows if "splits" in r}:
        bad = [r for r in rows if r.get("what") == name and r["mismatch_m"]]
        print(f"{name}: {'rows differ in ' + str(len(bad)) + ' runs' if bad else 'bitwise equal'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--replays", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="names, comma-separated")
    p.add_argument("--layers", default="qkv,o,gate_up,down,lm_head")
    p.add_argument("--rule-only", action="store_true", help="only the rule's K splits")
    p.add_argument(
        "--splits",
        default=None,
        help="K splits to try besides the rule's, comma-separated (default: 1, rule / 2, rule * 2)",
    )
    args = p.parse_args()
    args.splits = [int(s) for s in args.splits.split(",")] if args.splits else None
    args.candidates = args.candidates.split(",")
    if unknown := set(args.candidates) - set(CANDIDATES):
        p.error(f"unknown candidates {sorted(unknown)}; known: {', '.join(CANDIDATES)}")
    rows = []
    for shape in args.shapes.split(","):
        for layer, (n, k) in layer_shapes(shape).items():
            if layer not in args.layers.split(","):
                continue
            rows += sweep_layer(shape, layer, n, k, args)
            print(f"done {shape} {layer}", flush=True)
            if args.json:  # after each layer: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    summarize(rows)


if __name__ == "__main__":
    main()
