"""Stage 0's host work per step at a large decode batch, from a cProfile of rank 0's loop: the
scheduler's decisions (`next_microbatch`), applying returned tokens and building the outputs
(`apply_result`), sending them (`_send`), and the whole loop, per microbatch.

    python benchmark/profile_stage0.py --requests 256 --new-tokens 64 --json out.json

Runs `Engine.generate` on the embedded model (CPU by default; the host work does not depend on the
model's size) with PIPESERVE_PROFILE_DIR set; works on any build whose stage 0 has these names, so
that two builds can be compared on one machine (PYTHONPATH=<other build>/python).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import tempfile
import time

from pipeserve import Engine

# (label, function name, file name ending): cumulative time per microbatch
PARTS = [
    ("decide (next_microbatch)", "next_microbatch", "scheduler.py"),
    ("apply tokens + outputs (apply_result)", "apply_result", ".py"),
    ("send outputs (_send)", "_send", "worker.py"),
    ("whole loop", "event_loop_pp", ".py"),
]


def cumulative(stats: pstats.Stats, name: str, ending: str) -> float:
    total = 0.0
    for (file, _, func), row in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and file.endswith(ending):
            total += row[3]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out_dir = tempfile.mkdtemp(prefix="pipeserve-prof-")
    os.environ["PIPESERVE_PROFILE_DIR"] = out_dir
    prompts = [f"{i % 500}+{(7 * i) % 500}=" for i in range(args.requests)]
    params = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    with Engine(
        device=args.device,
        max_running_requests=args.requests,
        pp_max_micro_batch_size=args.requests,
    ) as engine:
        start = time.perf_counter()
        engine.generate(prompts, params)
        wall = time.perf_counter() - start
        steps = engine.stats.get("num_microbatches", 0)
    stats = pstats.Stats(os.path.join(out_dir, "rank0.prof"))
    rows = {label: cumulative(stats, name, end) / max(1, steps) * 1e3 for label, name, end in PARTS}
    print(
        f"{args.requests} requests x {args.new_tokens} tokens, {steps} microbatches, {wall:.2f} s"
    )
    print("| part | ms per microbatch |\n|---|---|")
    for label, ms in rows.items():
        print(f"| {label} | {ms:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "wall_s": wall, "ms_per_microbatch": rows}, f, indent=1)


if __name__ == "__main__":
    main()
