"""Tile shapes for deterministic mode's matmul (`model/invariant_matmul.py`), chosen from data: for
each projection of the 1B and 8B shapes, every candidate `Tiles` is checked bitwise against the
REFERENCE tiles (every row at M = 1..300, and a row alone) and timed at each M of --sizes
(default 1 and 256; 2048 is a prefill chunk, never for lm_head), beside what the
default engine runs there (cuBLAS; at M = 1 the one-row GEMV path). At M = 1 both run as the
engine's batch-1 step does: qkv and gate_up with the input norm, down with SiLU(gate) * up
(fused into the matmul where each path fuses them); `us1_plain` is the bare matmul.

    python benchmark/sweep_invariant_matmul.py --shapes 1b,8b --json /tmp/sweep.json
    python benchmark/pick_invariant_tiles.py /tmp/sweep.json   # the table it implies

K runs in the rule's number of ranges (`k_splits`), the one the engine uses (--all-splits: more).

Times are device microseconds per call: a CUDA graph of --calls calls, replayed, median of
--replays. Only candidates whose rows all match may share a table (a mismatch is printed).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from bench_offline import SHAPES
from pipeserve.model import gemv
from pipeserve.model import invariant_matmul as im
from pipeserve.model.invariant_matmul import Tiles

CANDIDATES = {
    # a few rows: weight rows on the MMA's M side (swapped); 16 or 32 of them run on mma.sync
    "swap16x16w1k128": Tiles(16, 16, 128, 1, 4, swap=True, per_sm=8),
    "swap16x32w2k128": Tiles(16, 32, 128, 2, 4, swap=True, per_sm=4),
    "swap16x64k128": Tiles(16, 64, 128, 4, 3, swap=True, per_sm=4),
    "swap16x128": Tiles(16, 128, 64, 4, 4, swap=True, per_sm=2),
    # many rows; the last three with the batch rows on the MMA's M side, one program per tile
    "swap32x128": Tiles(32, 128, 64, 4, 4, swap=True, per_sm=2),
    "64x128w4": Tiles(64, 128, 64, 4, 4),
    "128x128w8": Tiles(128, 128, 64, 8, 3),
    "128x256w8": Tiles(128, 256, 64, 8, 3),
}
HEAD_MAX = 256  # lm_head: decode batches only (a prompt's last token alone)


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


def one_row(layer: str, x: torch.Tensor, w: torch.Tensor, det: bool, tiles=None, splits=None):
    """The projection of one row as the engine runs it at batch 1: qkv and gate_up with the
    input norm, down with SiLU(gate) * up (fused where the path fuses), the others plain."""
    k = w.shape[1]
    nw = torch.ones(k, dtype=w.dtype, device=w.device)
    if layer in ("qkv", "gate_up"):
        if det:
            return lambda: im.norm_matmul(x[:1], x[1:2], nw, 1e-5, w, None, None, tiles, splits)
        return lambda: gemv.norm_linear(x[:1], x[1:2], nw, 1e-5, w)
    if layer == "down":
        gate_up = torch.cat([x[:1], x[1:2]], dim=1)
        if det:
            return lambda: im.silu_mul_matmul(gate_up, w, None, tiles, splits)
        return lambda: gemv.silu_mul_linear(gate_up, k, w)
    if det:
        return lambda: im.matmul(x[:1], w, None, tiles, splits)
    return lambda: gemv.linear(x[:1], w)


def sweep_layer(shape: str, layer: str, n: int, k: int, args) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).bfloat16()
    sizes = [m for m in args.sizes if layer != "lm_head" or m <= HEAD_MAX]
    x = torch.randn(max(300, *sizes), k, generator=gen, device="cuda").bfloat16()
    rule = im.k_splits(n, k, im.num_sms(x.device))
    base = {"shape": shape, "layer": layer, "n": n, "k": k, "rule_splits": rule}
    cublas = {
        f"us{m}": graph_us(lambda m=m: F.linear(x[:m], w), args.calls, args.replays) for m in sizes
    }
    gemv_us = graph_us(one_row(layer, x, w, False), args.calls, args.replays)
    rows = [{**base, "what": "cublas", **cublas}, {**base, "what": "default", "us1": gemv_us}]
    tried = {1, rule, rule // 2, rule * 2} & {s for s in (1, 2, 4, 8, 16) if k >= s * im.K_GRANULE}
    for splits in sorted(tried | {rule}) if args.all_splits else [rule]:
        ref = im.matmul(x, w, None, im.REFERENCE, splits)
        every = range(1, 301) if splits in (1, rule) else (1, 2, 17, 32, 64, 65, 129, 256, 300)
        every = [*every, *(m for m in sizes if m > 300)]
        for name, tiles in CANDIDATES.items():
            row = {**base, "what": name, "splits": splits}
            row["mismatch_m"] = mismatches(x, w, tiles, splits, ref, every)
            for m in sizes:
                fn = lambda m=m, t=tiles, s=splits: im.matmul(x[:m], w, None, t, s)  # noqa: E731
                row[f"us{m}"] = graph_us(fn, args.calls, args.replays)
            if 1 in sizes and tiles.block_m <= im.FUSE_MAX_ROWS:  # us1: as at batch 1
                row["us1_plain"] = row["us1"]
                row["us1"] = graph_us(one_row(layer, x, w, True, tiles, splits), args.calls, args.replays)  # fmt: skip
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
        for m in (m for m in (1, 32, 256, 2048) if f"us{m}" in cublas):
            best = sorted(ok, key=lambda r: r[f"us{m}"])[:5]
            line = ", ".join(f"{r['what']}/s{r['splits']} {r[f'us{m}']:.1f}" for r in best)
            base = f"cublas {cublas[f'us{m}']:.1f}" + (
                f" gemv {default['us1']:.1f}" if m == 1 else ""
            )
            print(f"  M={m:<4} {base} | {line}")
    for name in CANDIDATES:
        bad = [r for r in rows if r.get("what") == name and r["mismatch_m"]]
        print(f"{name}: {'rows differ in ' + str(len(bad)) + ' runs' if bad else 'bitwise equal'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--replays", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--sizes", default="1,256", help="M to time (the table's rows: 1, 32, 256)")
    p.add_argument("--all-splits", action="store_true", help="also K in rule/2, rule*2, 1 ranges")
    args = p.parse_args()
    args.sizes = [int(m) for m in args.sizes.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        for layer, (n, k) in layer_shapes(shape).items():
            rows += sweep_layer(shape, layer, n, k, args)
            print(f"done {shape} {layer}", flush=True)
            if args.json:  # after each layer: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    summarize(rows)


if __name__ == "__main__":
    main()
