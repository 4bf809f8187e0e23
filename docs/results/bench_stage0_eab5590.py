"""benchmark/bench_stage0.py's loop against build eab5590's modules (run with
PYTHONPATH=<a checkout of eab5590>/python): the scheduler's decision, process_result, and the
outputs as that build made them (a TokenOut per request in a StepOut, encoded by its codec)."""

from __future__ import annotations

import statistics
import time

import torch
from pipeserve.engine.finish import FinishChecker
from pipeserve.engine.ipc import StepOut, TokenOut, encode
from pipeserve.engine.req import Req
from pipeserve.engine.sampling_params import SamplingParams
from pipeserve.engine.scheduler import Scheduler

from pipeserve.config import resolve_config


def token_out(req, s) -> TokenOut:  # StageWorker._token_out of that build
    return TokenOut(
        req.rid,
        [s.token_id],
        logprobs=None if s.logprob is None else [s.logprob],
        top_logprobs=None if s.top_logprobs is None else [[list(p) for p in s.top_logprobs]],
        finish_reason=req.finish_reason,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=len(req.output_ids),
        queue_time_s=None,
    )


def main(batch: int = 256, steps: int = 200) -> None:
    cfg = resolve_config(device="cpu", max_running_requests=batch, pp_max_micro_batch_size=batch)
    sched = Scheduler(cfg, batch * (steps + 64), 4096, FinishChecker({2}, 4096), vocab_size=32000)
    params = SamplingParams(max_new_tokens=steps + 16, ignore_eos=True)
    for i in range(batch):
        assert sched.add(Req(f"r{i:05d}", list(range(3, 35)), params, seed=i)) is None
    times = {"decide": [], "apply": [], "rows": [], "encode": []}
    for step in range(steps + 1):
        t0 = time.perf_counter()
        desc, reqs = sched.next_microbatch(step)
        t1 = time.perf_counter()
        sched.arrived(reqs)
        n = int(desc.sampled().sum())
        sampled = sched.process_result(desc, reqs, {"next_token_ids": torch.full((n,), 7)})
        t2 = time.perf_counter()
        by_req = {id(s.req): s for s in sampled}
        outs = [token_out(r, by_req[id(r)]) for r in reqs if id(r) in by_req]
        t3 = time.perf_counter()
        encode(StepOut(outs, {}))
        t4 = time.perf_counter()
        if step:
            for name, a, b in (("decide", t0, t1), ("apply", t1, t2), ("rows", t2, t3)):
                times[name].append((b - a) * 1e6)
            times["encode"].append((t4 - t3) * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["total"] = sum(med.values())
    print("| part | us per step |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.0f} |")


if __name__ == "__main__":
    main()
