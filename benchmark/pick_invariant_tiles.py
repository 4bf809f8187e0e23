"""Reads the JSON of `sweep_invariant_matmul.py` and prints, for each batch size M, what a decode
step's projections cost under each candidate tile shape (a step: layers x qkv, o, gate_up, down,
plus lm_head; at M = 2048, a prefill chunk, without lm_head), at the splits of the current rule:
the fastest candidates whose rows all matched, and the default's cuBLAS/GEMV sum beside them.
It is how `invariant_matmul.TABLE` is chosen: with --write, the fastest candidate over the
shapes swept (the sum of each shape's ratio to the default) at M = 1 for up to 16 rows, at 32
for up to 64, at 256 for up to 256 and at 2048 (a prefill chunk) beyond, is written into the
TABLE of the given file. The sweep repeats each projection, so the weights of the smaller ones
stay in L2, which a decode step's do not; check the pick in the engine
(`bench_offline.py --deterministic`) before committing it (TABLE's row up to 16 rows was chosen
so, between the sweep's two fastest, and --write replaces it).

    python benchmark/pick_invariant_tiles.py /tmp/sweep_invariant.json \
        --write python/pipeserve/model/invariant_matmul.py
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

from random_checkpoint import SHAPES
from sweep_invariant_matmul import CANDIDATES

BUCKETS = ((16, 1), (64, 32), (256, 256), (2**62, 2048))  # (largest M, the M it is picked at)


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
    p.add_argument("--write", default=None, help="invariant_matmul.py whose TABLE to replace")
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
    if args.write:
        write_table(args.write, pick(rows))


def pick(rows: list[dict]) -> list[tuple[int, str]]:
    shapes = sorted({r["shape"] for r in rows})
    table = []
    for most, m in BUCKETS:
        ratios: dict[str, float] = defaultdict(float)
        for shape in shapes:
            sums, default = step_sums(rows, shape, m)
            for name, us in sums.items():
                ratios[name] += us / default
        swept = [s for s in shapes if step_sums(rows, s, m)[0]]  # a sweep cut short: fewer
        ok = {n: r for n, r in ratios.items() if all(n in step_sums(rows, s, m)[0] for s in swept)}
        table.append((most, min(ok, key=ok.get)))
        print(f"M <= {most}: {table[-1][1]} (mean ratio {ok[table[-1][1]] / len(swept):.2f}x)")
    return table


def short(t) -> str:
    """`Tiles(...)` as written by hand: the shape positionally, the switches only where set."""
    flags = "".join(f", {f}=True" for f in ("swap", "plain", "tma") if getattr(t, f))
    per_sm = f", per_sm={t.per_sm}" if t.per_sm != 1 else ""
    return f"Tiles({t.block_m}, {t.block_n}, {t.block_k}, {t.warps}, {t.stages}{flags}{per_sm})"


def write_table(path: str, table: list[tuple[int, str]]) -> None:
    bound = {2**62: "2**62"}
    lines = [
        f"    ({bound.get(most, most)}, {short(CANDIDATES[name])}),  # {name}"
        for most, name in table
    ]
    body = "TABLE: tuple[tuple[int, Tiles], ...] = (\n" + "\n".join(lines) + "\n)\n"
    with open(path) as f:
        text = f.read()
    text, n = re.subn(
        r"TABLE: tuple\[tuple\[int, Tiles\], \.\.\.\] = \(\n.*?\n\)\n", body, text, flags=re.S
    )
    assert n == 1, "TABLE not found"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote TABLE into {path}")


if __name__ == "__main__":
    main()
