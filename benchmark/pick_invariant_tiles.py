"""The tile table of deterministic mode's matmul implied by a sweep (`sweep_invariant_matmul.py`):
for each row of the table's layout (largest M, largest N), the candidate whose rows matched the
reference in every run and whose decode step is shortest, at the M that stands for the row
(1, 32, 256). A step's time is the sum over its projections (layers x qkv, o, gate_up, down, plus
lm_head) of those with N in the row's range, over cuBLAS's (the one-row GEMV at M = 1) sum for
the same projections, averaged over the swept shapes.

    python benchmark/pick_invariant_tiles.py sweep.json [--write python/pipeserve/model/invariant_matmul.py]

--write replaces the TABLE in that file (the device copy, before the step's benchmark runs).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

from bench_offline import SHAPES
from pipeserve.model import invariant_matmul as im
from pipeserve.model.invariant_matmul import Tiles
from sweep_invariant_matmul import CANDIDATES

NARROW = 8192  # largest N of the few-rows table row for narrow projections
ROWS = (  # the table's rows: largest M, largest N, and the M that stands for the row
    (16, NARROW, 1),
    (16, 2**62, 1),
    (64, 2**62, 32),
    (2**62, NARROW, 256),
    (2**62, 2**62, 256),
)


def step_ratio(rows: list[dict], name: str, most_n: int, least_n: int, m: int) -> float | None:
    """Mean over shapes of sum(layers x candidate us) / sum(layers x baseline us)."""
    key, ratios = f"us{m}", []
    for shape in sorted({r["shape"] for r in rows}):
        ours = base = 0.0
        mine = (r for r in rows if (r["shape"], r["what"]) == (shape, name))
        for r in (r for r in mine if r["splits"] == r["rule_splits"]):
            if not least_n < r["n"] <= most_n or key not in r:
                continue
            count = 1 if r["layer"] == "lm_head" else SHAPES[shape]["layers"]
            baseline = next(
                b for b in rows
                if (b["shape"], b["layer"]) == (shape, r["layer"])
                and b["what"] == ("default" if m == 1 else "cublas")
            )  # fmt: skip
            ours += count * r[key]
            base += count * baseline[key]
        if base:
            ratios.append(ours / base)
    return statistics.mean(ratios) if ratios else None


def pick(rows: list[dict]) -> list[tuple[int, int, Tiles, str, float | None]]:
    """(largest M, largest N, tiles, name, ratio) per table row; a row whose M was not swept
    keeps the table's tiles."""
    bad = {r["what"] for r in rows if r.get("mismatch_m")}
    ok = [name for name in CANDIDATES if name not in bad and any(r["what"] == name for r in rows)]
    table, least_n = [], 0
    for (most_m, most_n, m), (_, _, kept) in zip(ROWS, im.TABLE, strict=True):
        fits = [name for name in ok if m > 1 or CANDIDATES[name].block_m <= im.FUSE_MAX_ROWS]
        scored = [(step_ratio(rows, name, most_n, least_n, m), name) for name in fits]
        scored = [(ratio, name) for ratio, name in scored if ratio is not None]
        if scored:
            ratio, name = min(scored)
            table.append((most_m, most_n, CANDIDATES[name], name, ratio))
        else:
            table.append((most_m, most_n, kept, "kept (not swept)", None))
        least_n = most_n if most_n < 2**62 else 0
    return table


def table_source(table: list[tuple[int, int, Tiles, str, float | None]]) -> str:
    lines = ["TABLE: tuple[tuple[int, int, Tiles], ...] = ("]
    for most_m, most_n, tiles, _, _ in table:
        bound = lambda v: "2**62" if v >= 2**62 else str(v)  # noqa: E731
        fields = f"{tiles.block_m}, {tiles.block_n}, {tiles.block_k}, {tiles.warps}, {tiles.stages}"
        extra = (", swap=True" if tiles.swap else "") + (
            f", per_sm={tiles.per_sm}" if tiles.per_sm != 1 else ""
        )
        lines.append(f"    ({bound(most_m)}, {bound(most_n)}, Tiles({fields}{extra})),")
    return "\n".join(lines) + "\n)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sweep")
    p.add_argument("--write", default=None, help="a copy of invariant_matmul.py to rewrite")
    args = p.parse_args()
    with open(args.sweep) as f:
        rows = json.load(f)["rows"]
    table = pick(rows)
    for most_m, most_n, _, name, ratio in table:
        bounds = (f"M <= {most_m}" if most_m < 2**62 else "larger M") + (
            f", N <= {most_n}" if most_n < 2**62 else ""
        )
        print(
            f"{bounds}: {name}" + (f" ({ratio:.2f}x the baseline's projections)" if ratio else "")
        )
    source = table_source(table)
    print(source)
    if args.write:
        with open(args.write) as f:
            text = f.read()
        text, count = re.subn(r"TABLE: tuple\[.*?\n\)", lambda _: source, text, flags=re.S)
        assert count == 1, "TABLE not found"
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
