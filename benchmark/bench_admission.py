"""How long a large offline batch takes to reach the pipeline: from `Engine.submit_many` to stage
0's first scheduling decision (read from a `--pp-trace` of the run), split into the front end's
share (the `submit_many` call) and the rest (IPC, stage 0's admission of every request).

    python benchmark/bench_admission.py --requests 1024 --prompt-len 128 [--device cuda]

Uses the embedded default model (admission does not depend on the model's size). With
PIPESERVE_PROFILE_DIR set, stage 0's loop runs under cProfile and writes rank0.txt there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

from pipeserve import Engine
from pipeserve.model.config import ModelConfig
from pipeserve.sampling_params import SamplingParams


def first_schedule_after(trace_path: str, epoch_s: float) -> float | None:
    with open(trace_path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    starts = [
        e["ts"] / 1e6
        for e in events
        if e.get("name") == "schedule" and e.get("pid") == 0 and e["ts"] / 1e6 > epoch_s
    ]
    return min(starts) - epoch_s if starts else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--pp-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = random.Random(0)
    trace = os.path.join(tempfile.mkdtemp(prefix="bench-admission-"), "trace.json")
    rows = []
    with Engine(
        device=args.device,
        pp_size=args.pp_size,
        max_running_requests=args.requests,
        context_length=args.prompt_len + 8,
        pp_trace=trace,
    ) as engine:
        vocab = ModelConfig.from_dir(engine.config.model_path).vocab_size
        reqs = [
            (
                [rng.randrange(3, vocab) for _ in range(args.prompt_len)],
                SamplingParams(max_new_tokens=1, ignore_eos=True),
            )
            for _ in range(args.requests)
        ]
        engine.generate(input_ids=[reqs[0][0]], sampling_params={"max_new_tokens": 2})
        for _ in range(args.repeats):
            time.sleep(0.2)  # the pipeline idle, as before a batch arrives
            epoch = time.time()
            start = time.perf_counter()
            states = engine.submit_many(reqs)
            submit_s = time.perf_counter() - start
            engine.wait(states)
            rows.append(
                {"submit_s": submit_s, "epoch": epoch, "wall_s": time.perf_counter() - start}
            )
    for row in rows:  # the trace is written when the engine shuts down
        row["first_schedule_s"] = first_schedule_after(trace, row.pop("epoch"))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"{args.requests} requests x {args.prompt_len} tokens on {args.device}, pp={args.pp_size}: "
        f"submit_many {med['submit_s'] * 1e3:.1f} ms, first scheduling decision after "
        f"{med['first_schedule_s'] * 1e3:.1f} ms, all done after {med['wall_s'] * 1e3:.0f} ms "
        f"(medians of {args.repeats})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": rows, "median": med}, f, indent=1)


if __name__ == "__main__":
    main()
