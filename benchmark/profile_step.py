"""Where a decode step's time goes on one GPU: the device time of the step's CUDA graph replayed
back to back, the host's share of a whole `ModelRunner.forward` (graph + sampling), a
per-kernel table (torch.profiler) of one replay, and the forward's host time by op and CUDA
runtime call.

    python benchmark/profile_step.py --shape 1b --batches 1,32,256 --json /tmp/step.json

Decodes of `--seq-len` tokens each (prefix seq-len - 1, one new token), on random weights
(bench_offline's checkpoint); the floor is the weight bytes over the device copy bandwidth.
`--deterministic` profiles deterministic mode's step (batch-invariant kernels) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_offline import copy_bandwidth
from random_checkpoint import SHAPES, make_model


def build_runner(path: str, max_bs: int, slots: int, deterministic: bool = False):
    from pipeserve.config import resolve_config
    from pipeserve.distributed import DistConfig, get_tp_group, init_distributed
    from pipeserve.model.config import ModelConfig
    from pipeserve.model.parallel import ParallelContext
    from pipeserve.runner.model_runner import ModelRunner
    from pipeserve.utils import free_port

    init_distributed(
        DistConfig(pp_size=1, init_method=f"tcp://127.0.0.1:{free_port()}", device="cuda")
    )
    cfg = resolve_config(
        model_path=path,
        device="cuda",
        dtype="bfloat16",
        max_running_requests=max_bs,
        cuda_graph_max_bs=max_bs,
        deterministic=deterministic,
    )
    ctx = ParallelContext(tp_group=get_tp_group(), batch_invariant=deterministic)
    runner = ModelRunner(cfg, ModelConfig.from_dir(path), ctx, torch.device("cuda", 0))
    runner.allocate_kv(slots)
    runner.warm_up()
    runner.capture_graphs()
    return runner


def decode_desc(batch: int, seq_len: int, slots: int):
    """B greedy decodes at position seq_len - 1 on rows 0..B-1, each over its own slots."""
    from pipeserve.scheduler.descriptor import REQ_FLOAT_COLUMNS, REQ_INT_COLUMNS, BatchDescriptor

    ints = np.zeros((batch, len(REQ_INT_COLUMNS)), np.int64)
    col = {n: i for i, n in enumerate(REQ_INT_COLUMNS)}
    ints[:, col["req_pool_idx"]] = np.arange(batch)
    ints[:, col["prefix_len"]] = seq_len - 1
    ints[:, col["extend_len"]] = 1
    ints[:, col["sample"]] = 1
    ints[:, col["step"]] = 1
    ints[:, col["prompt_len"]] = seq_len - 1
    floats = np.zeros((batch, len(REQ_FLOAT_COLUMNS)), np.float32)
    floats[:, REQ_FLOAT_COLUMNS.index("repetition_penalty")] = 1.0
    out = (np.arange(batch) * seq_len + seq_len - 1) % slots + 1
    return BatchDescriptor("batch", 0, ints, floats, out, np.zeros(0, np.int64))


def device_ms(fn, iters: int) -> float:
    """Mean device time of `fn` run back to back (the host launches ahead of the device)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def host_ms(fn, iters: int) -> float:
    """Mean host time of a call of `fn` (not waiting for the device between calls)."""
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        total += time.perf_counter() - t
        torch.cuda.synchronize()
    return total / iters * 1e3


def host_profile(fn, iters: int, top: int) -> str:
    """cProfile of `iters` calls of fn (synchronized between calls), by own time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    for _ in range(iters):
        profiler.runcall(fn)
        torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def kernel_table(fn, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key[:90], "calls": e.count / 5, "us": us / 5})
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def host_table(fn, top: int, iters: int = 20) -> list[dict]:
    """Host time of a call of `fn` by op and CUDA runtime call (torch.profiler, self CPU time;
    synchronized between calls): where the host's share of a forward goes below Python."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
            torch.cuda.synchronize()
    rows = [
        {"op": e.key[:90], "calls": e.count / iters, "us": e.self_cpu_time_total / iters}
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0 and e.key != "cudaDeviceSynchronize"
    ]
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="1b", choices=["1b", "8b"])
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--model-path", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--deterministic", action="store_true", help="deterministic mode's kernels")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    path = args.model_path or os.path.join(tempfile.gettempdir(), f"ckpt-{args.shape}")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        make_model(path, SHAPES[args.shape], torch.bfloat16, "cuda")
    slots = max(batches) * args.seq_len + 8
    runner = build_runner(path, max(batches), slots, args.deterministic)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    bw = copy_bandwidth("cuda")
    floor_ms = weight_bytes / bw * 1e3
    runner.table.slots[: max(batches), : args.seq_len] = torch.arange(
        1, max(batches) * args.seq_len + 1, device="cuda"
    ).view(max(batches), args.seq_len)[:, : args.seq_len]
    rows = []
    print(
        f"{args.shape}: weights {weight_bytes / 1e9:.2f} GB, copy {bw / 1e12:.2f} TB/s, floor {floor_ms:.3f} ms"
    )
    print(
        f"{'batch':>6} {'graph ms':>9} {'x floor':>8} {'forward ms':>11} {'host ms':>8} "
        f"{'replay host ms':>14}"
    )
    for b in batches:
        desc = decode_desc(b, args.seq_len, slots)
        bs = next(s for s in runner.graphs.sizes if s >= b)
        runner.graphs.replay(desc, None, None)
        graph = runner.graphs.graphs[bs]

        def forward(desc=desc):
            return runner.forward(desc, None)

        row = {
            "batch": b,
            "bucket": bs,
            "graph_ms": device_ms(graph.replay, args.iters),
            "forward_ms": device_ms(forward, args.iters),
            "host_ms": host_ms(forward, 50),
            "replay_host_ms": host_ms(graph.replay, 50),
            "kernels": kernel_table(graph.replay, args.top),
            "host_ops": host_table(forward, args.top),
        }
        row["graph_x_floor"] = row["graph_ms"] / floor_ms
        rows.append(row)
        print(
            f"{b:>6} {row['graph_ms']:>9.3f} {row['graph_x_floor']:>8.2f} "
            f"{row['forward_ms']:>11.3f} {row['host_ms']:>8.3f} {row['replay_host_ms']:>14.3f}"
        )
        if b == batches[0]:
            print(host_profile(forward, 100, 25))
    for row in rows:
        print(f"\nbatch {row['batch']} (graph bucket {row['bucket']}): kernels of one replay")
        for k in row["kernels"]:
            print(f"  {k['us']:9.1f} us  x{k['calls']:<5.0f} {k['kernel']}")
        print(f"batch {row['batch']}: host time of one forward by op (self CPU, profiled)")
        for k in row["host_ops"]:
            print(f"  {k['us']:9.1f} us  x{k['calls']:<5.1f} {k['op']}")
    if args.json:
        meta = {
            "shape": args.shape,
            "weight_bytes": weight_bytes,
            "copy_bw": bw,
            "floor_ms": floor_ms,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
