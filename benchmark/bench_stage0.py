"""Stage 0's host work per decode step, without a model: the scheduler's decision
(`next_microbatch`), applying the returned tokens (`process_result`), building the front ends'
rows (`result_rows`) and encoding them, for B running requests, timed per step (median).

    python benchmark/bench_stage0.py --batch 256 --steps 200 --json out.json

The tokens come back at once (no pipeline), so every step is a full decode microbatch of B requests
(max_new_tokens is set past --steps: none finishes while timed). `--churn`: requests end after 8-40
tokens and are replaced at once by new ones whose prompts share prefixes (groups of 8 over 32
prefixes, a pool that forces eviction), so the prefix cache matches, inserts and evicts every step;
the mean per step is reported, with `--disable-radix-cache` for the same run without the cache.
"""

from __future__ import annotations

import argparse
import json
import random
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


def run(
    batch: int, steps: int, frontends: int, churn: bool = False, cache: bool = True
) -> dict[str, float]:
    cfg = resolve_config(
        device="cpu",
        max_running_requests=batch,
        pp_max_micro_batch_size=batch,
        disable_radix_cache=not cache,
    )
    slots = batch * 80 if churn else batch * (steps + 64)
    sched = Scheduler(cfg, slots, 4096, FinishChecker({2}, 4096), vocab_size=32000)
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 32000) for _ in range(24)] for _ in range(32)]
    live: dict[str, Req] = {}

    def add(i: int) -> None:
        if churn:
            ids = prefixes[(i // 8) % 32] + [rng.randrange(3, 32000) for _ in range(8)]
            params = SamplingParams(max_new_tokens=rng.randrange(8, 41), ignore_eos=True)
        else:
            ids, params = (
                list(range(3, 35)),
                SamplingParams(max_new_tokens=steps + 16, ignore_eos=True),
            )
        req = Req(f"r{i:05d}", ids, params, seed=i, owner=i % frontends)
        assert sched.add(req) is None
        live[req.rid] = req

    for i in range(batch):
        add(i)
    added = batch
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
        while churn and len(live) < batch:  # the ended ones, replaced
            add(added)
            added += 1
    pick = statistics.mean if churn else statistics.median
    result = {name: pick(v) for name, v in times.items()}
    result["total"] = sum(result.values())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--frontends", type=int, default=1)
    ap.add_argument("--churn", action="store_true")
    ap.add_argument("--disable-radix-cache", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    us = run(args.batch, args.steps, args.frontends, args.churn, not args.disable_radix_cache)
    what = "mean us per step, with churn" if args.churn else "median us per decode step"
    cache = "off" if args.disable_radix_cache else "on"
    print(f"batch {args.batch}, {args.frontends} front end(s), prefix cache {cache}: {what}")
    print("| part | us per step | us per request |\n|---|---|---|")
    for name, value in us.items():
        print(f"| {name} | {value:.0f} | {value / args.batch:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "us_per_step": us}, f, indent=1)


if __name__ == "__main__":
    main()
