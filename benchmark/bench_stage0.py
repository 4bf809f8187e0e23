"""Stage 0's host work per decode step, without a model: the scheduler's decision
(`next_microbatch`), applying the returned tokens (`process_result`), building the front ends'
rows (`result_rows`) and encoding them, for B running requests, timed per step (median).

    python benchmark/bench_stage0.py --batch 256 --steps 200 --json out.json

The tokens come back at once (no pipeline), so every step is a full decode microbatch of B requests
(max_new_tokens is set past --steps: none finishes while timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeserve.config import resolve_config
from pipeserve.ipc.messages import encode
from pipeserve.sampling_params import SamplingParams
from pipeserve.scheduler.descriptor import TokenReply
from pipeserve.scheduler.finish import FinishChecker
from pipeserve.scheduler.req import Req
from pipeserve.scheduler.scheduler import Scheduler
from pipeserve.stage.outputs import result_rows


def run(batch: int, steps: int, frontends: int) -> dict[str, float]:
    cfg = resolve_config(device="cpu", max_running_requests=batch, pp_max_micro_batch_size=batch)
    sched = Scheduler(cfg, batch * (steps + 64), 4096, FinishChecker({2}, 4096), vocab_size=32000)
    params = SamplingParams(max_new_tokens=steps + 16, ignore_eos=True)
    live = {}
    for i in range(batch):
        req = Req(f"r{i:05d}", list(range(3, 35)), params, seed=i, owner=i % frontends)
        assert sched.add(req) is None
        live[req.rid] = req
    times: dict[str, list[float]] = {"decide": [], "apply": [], "rows": [], "encode": []}
    for step in range(steps + 1):  # the first step is the prefill: not counted
        t0 = time.perf_counter()
        desc, reqs = sched.next_microbatch(step)
        t1 = time.perf_counter()
        sched.arrived(reqs)
        tokens = {"next_token_ids": torch.full((int(desc.sampled().sum()),), 7)}  # as received
        sampled = sched.process_result(desc, reqs, TokenReply.from_tensors(tokens))
        t2 = time.perf_counter()
        outputs = result_rows(reqs, sampled, live, frontends)
        t3 = time.perf_counter()
        for rows in outputs.builders:
            encode(rows.out)
        t4 = time.perf_counter()
        if step:
            for name, a, b in (("decide", t0, t1), ("apply", t1, t2), ("rows", t2, t3)):
                times[name].append((b - a) * 1e6)
            times["encode"].append((t4 - t3) * 1e6)
    medians = {name: statistics.median(v) for name, v in times.items()}
    medians["total"] = sum(medians.values())
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--frontends", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    us = run(args.batch, args.steps, args.frontends)
    print(f"batch {args.batch}, {args.frontends} front end(s): median us per decode step")
    print("| part | us per step | us per request |\n|---|---|---|")
    for name, value in us.items():
        print(f"| {name} | {value:.0f} | {value / args.batch:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "us_per_step": us}, f, indent=1)


if __name__ == "__main__":
    main()
