"""Reads the JSON of `sweep_invariant_matmul.py` and prints, for each batch size M, what a decode
step's projections cost under each candidate tile shape (a step: layers x qkv, o, gate_up, down,
plus lm_head; at M = 2048, a prefill chunk, without lm_head), at the splits of the current rule:
the fastest candidates whose rows all matched, and the default's cuBLAS/GEMV sum beside them.
It is how `invariant_matmul.TABLE` is chosen; the choice itself is written there by hand.

    python benchmark/pick_invariant_tiles.py /tmp/sweep_invariant.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from bench_offline import SHAPES


def step_sums(rows: list[dict], shape: str, m: int) -> tuple[dict[str, float], float]:
    """Per candidate, the step's projection time (us) at M = m under the rule's splits, for
    candidates measured on every projection and matching everywhere; and the default's. Where
    the sweep timed gate_up with SiLU * up (`+glu` rows, and cuBLAS then the silu kernel), a
    step's gate_up is that, for the candidates and the default (M > 1) alike."""
    layers = SHAPES[shape]["layers"]
    weight = {"qkv": layers, "o": layers, "gate_up": layers, "down": layers, "lm_head": 1}
    if m > 256:
        weight.pop("lm_head")
    key = f"us{m}"
    mine = [r for r in rows if r["shape"] == shape and r["layer"] in weight and key in r]
    bad = {r["what"] for r in mine if r.get("mismatch_m")}
    times: dict[str, dict[str, float]] = defaultdict(dict)
    for r in mine:
        if r["what"] == ("default" if m == 1 else "cublas"):
            times["default"].setdefault(r["layer"], r[key])
        elif r["what"] == "cublas+silu" and m > 1:
            times["default"][r["layer"]] = r[key]
        elif r.get("splits") == r["rule_splits"] and r["what"] not in bad:
            name = r["what"].removesuffix("+glu")
            if r["what"].endswith("+glu") or r["layer"] not in times[name]:
                times[name][r["layer"]] = r[key]
    whole = {
        name: sum(weight[layer] * us for layer, us in t.items())
        for name, t in times.items()
        if set(t) == set(weight)
    }
    return whole, whole.pop("default", float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json")
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args()
    with open(args.json) as f:
        rows = json.load(f)["rows"]
    top = args.top
    for shape in sorted({r["shape"] for r in rows}):
        for m in (1, 32, 256, 2048):
            sums, default = step_sums(rows, shape, m)
            if not sums:
                continue
            best = sorted(sums.items(), key=lambda kv: kv[1])[:top]
            line = ", ".join(f"{name} {us:.0f} ({us / default:.2f}x)" for name, us in best)
            print(f"{shape} M={m:<4} default {default:.0f} us | {line}")
    bad = sorted({r["what"] for r in rows if r.get("mismatch_m")})
    print("rows differ:", ", ".join(bad) or "none")


if __name__ == "__main__":
    main()
