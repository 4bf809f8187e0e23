"""Deterministic mode's projections at decode batch sizes, timed as a decode step meets them: each
call reads another copy of the weights (--layers copies, a model's layers), so the weights come
from HBM, not L2. `sweep_invariant_matmul.py` repeats one weight, which for the narrow
projections of a 1B model (8-13 MB) stays in the 50 MB L2, and so misjudges a decode step.

For each projection of the shape, each candidate tile (`sweep_invariant_matmul.CANDIDATES`) at
each K split is checked bitwise against the REFERENCE tiles at the same split (M = 1, 2, 7, 16
and a row alone), and the table's own choice at that split at every M = 1..300; then timed at
the decode sizes, beside the default engine's kernels (the one-row GEMV, cuBLAS; SiLU * up in
down's). The step's norms are left out of both.

    python benchmark/decode_invariant_matmul.py --shape 1b --json /tmp/decode_1b.json

Times are device microseconds per call: a CUDA graph of one call per weight copy, replayed,
median of --replays. The summary adds, per split rule, the projections of one decode step
(layers x (qkv + o + gate_up + down) + lm_head) at each M.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from pipeserve.model import gemv
from pipeserve.model import invariant_matmul as im
from pipeserve.model.fused import silu_and_mul
from sweep_invariant_matmul import CANDIDATES, SHAPES, graph_us, layer_shapes

DEFAULT_CANDIDATES = (
    "tmaswap16x32w2,tmaswap16x16w1,tmaswap16x32k256w2,tmaswap16x32k256w2s4,tmaswap16x32w2s6,"
    "tmaswap16x16k256w1s4,swap16x32w2,swap16x128"
)
SMALL = (1, 2, 7, 16)  # the rows a candidate for up to 16 rows is checked at


def chain_us(fn, copies: int, replays: int) -> float:
    """Device us per call of fn(i) over weight copies i = 0..copies-1, in one CUDA graph."""
    turn = itertools.cycle(range(copies))
    return graph_us(lambda: fn(next(turn)), copies, replays)


def default_fn(layer: str, x, ws, m: int):
    """The default engine's kernel for this projection at m rows."""
    if layer == "down":  # its input is gate | up: SiLU * up runs in the GEMV's prologue, or
        # before cuBLAS at more rows (so gate_up is the bare product)
        return lambda i: gemv.silu_mul_linear(x[:m], ws[i].shape[1], ws[i])
    return lambda i: gemv.linear(x[:m], ws[i])


def sweep_projection(layer: str, n: int, k: int, args) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    copies = 1 if layer == "lm_head" else args.layers
    ws = [
        (torch.randn(n, k, generator=gen, device="cuda") * 0.02).bfloat16() for _ in range(copies)
    ]
    x = torch.randn(300, k, generator=gen, device="cuda").bfloat16()
    glu = layer == "gate_up"
    rule = im.k_splits(n, k, im.num_sms(x.device))
    base = {"layer": layer, "n": n, "k": k, "rule_splits": rule, "copies": copies}
    rows = []
    x_down = torch.randn(300, 2 * k, generator=gen, device="cuda").bfloat16()
    row = {**base, "what": "default"}
    for m in args.sizes:
        row[f"us{m}"] = chain_us(default_fn(layer, x_down if layer == "down" else x, ws, m), copies, args.replays)  # fmt: skip
    rows.append(row)
    splits_tried = sorted(
        {rule, *args.splits} & {s for s in (1, 2, 4, 8, 16) if k >= s * im.K_GRANULE}
    )
    for splits in splits_tried:
        w = ws[0]
        ref = im.matmul(x, w, None, im.REFERENCE, splits)
        if glu:
            ref = silu_and_mul(ref, n // 2)

        def table(m, i=0, s=splits):
            return im.matmul(x[:m], ws[i], None, None, s, glu=glu)

        row = {**base, "what": "table", "splits": splits}
        row["mismatch_m"] = [m for m in range(1, 301) if not torch.equal(table(m), ref[:m])]
        for m in args.sizes:
            row[f"us{m}"] = chain_us(lambda i, m=m: table(m, i), copies, args.replays)
        rows.append(row)
        for name in args.candidates:
            t = CANDIDATES[name]

            def cand(m, i=0, t=t, s=splits):
                return im.matmul(x[:m], ws[i], None, t, s, glu=glu)

            row = {**base, "what": name, "splits": splits}
            row["mismatch_m"] = [m for m in SMALL if not torch.equal(cand(m), ref[:m])]
            if not torch.equal(im.matmul(x[7:8], w, None, t, splits, glu=glu), ref[7:8]):
                row["mismatch_m"].append(-7)  # row 7 alone
            for m in (m for m in args.sizes if m <= 16):
                row[f"us{m}"] = chain_us(lambda i, m=m: cand(m, i), copies, args.replays)
            rows.append(row)
        for r in rows[-len(args.candidates) - 1 :]:
            if r["mismatch_m"]:
                print("MISMATCH", json.dumps(r), flush=True)
    return rows


def summarize(rows: list[dict], layers: int, sizes) -> None:
    print(
        f"\nus per call (weights from HBM); a step = {layers} x (qkv + o + gate_up + down) + lm_head"
    )
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer]
        print(f"\n{layer} N={mine[0]['n']} K={mine[0]['k']} rule={mine[0]['rule_splits']}")
        for r in mine:
            bad = " MISMATCH" if r.get("mismatch_m") else ""
            cells = "  ".join(f"M={m}: {r[f'us{m}']:7.1f}" for m in sizes if f"us{m}" in r)
            print(f"  {r['what']:<20} s{r.get('splits', '-'):<3} {cells}{bad}")
    print("\nbest per projection at M=1 (matching rows only), and the step it adds up to")
    step = {"default": 0.0, "table at the rule": 0.0, "best": 0.0}
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer and "us1" in r]
        times = layers if layer != "lm_head" else 1
        default = next(r for r in mine if r["what"] == "default")
        rule = next(r for r in mine if r["what"] == "table" and r["splits"] == r["rule_splits"])
        ok = [r for r in mine if "splits" in r and not r["mismatch_m"]]
        best = min(ok, key=lambda r: r["us1"])
        step["default"] += times * default["us1"]
        step["table at the rule"] += times * rule["us1"]
        step["best"] += times * best["us1"]
        print(f"  {layer:<8} default {default['us1']:6.1f}  rule {rule['us1']:6.1f}  best {best['what']}/s{best['splits']} {best['us1']:6.1f}")  # fmt: skip
    print("  step: " + ", ".join(f"{k} {v:.0f} us" for k, v in step.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument(
        "--layers", type=int, default=None, help="weight copies (default: the shape's layers)"
    )
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--sizes", default="1,4,16,32,256")
    p.add_argument("--splits", default="1,2,4,8", help="K splits to try besides the rule's")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="names, comma-separated")
    p.add_argument("--projections", default="qkv,o,gate_up,down,lm_head")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.layers = args.layers or SHAPES[args.shape]["layers"]
    args.sizes = [int(m) for m in args.sizes.split(",")]
    args.splits = [int(s) for s in args.splits.split(",")]
    args.candidates = args.candidates.split(",")
    if unknown := set(args.candidates) - set(CANDIDATES):
        p.error(f"unknown candidates {sorted(unknown)}; known: {', '.join(CANDIDATES)}")
    rows = []
    for layer, (n, k) in layer_shapes(args.shape).items():
        if layer not in args.projections.split(","):
            continue
        rows += sweep_projection(layer, n, k, args)
        torch.cuda.empty_cache()  # the copies of this projection's weights
        print(f"done {layer}", flush=True)
        if args.json:  # after each projection: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    summarize(rows, args.layers, args.sizes)


if __name__ == "__main__":
    main()
