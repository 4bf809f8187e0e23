"""Deterministic mode's decode attention (`attention/invariant_kernels.py`) on one GPU: device time
of one layer's call, for batches of short requests and the same with one long request among
them, under each number of programs along the splits that a full batch may keep
(`MIN_GRID_SPLITS`) and each schedule (`--schedules`: keys per block / per split / warps), beside
the default backend (`triton`) on the same batch; and one prompt's prefill (the extend kernel).

    python benchmark/bench_invariant_attention.py --json /tmp/attn.json

A long request among many short ones is the case the floor is for: with one program along the
splits, its splits run one after the other while the batch waits for them. Times are device
microseconds per call: a CUDA graph of --calls calls, replayed, median of --replays. Every
variant's output is checked bitwise against the first (which program runs a split changes
nothing).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from pipeserve.model.attention import create_backend
from pipeserve.model.attention import invariant_kernels as kernels
from pipeserve.model.attention.base import BackendSpec
from pipeserve.model.forward_batch import ForwardBatch
from sweep_invariant_matmul import graph_us


def decode_case(lens: list[int], heads: int, kv_heads: int, dim: int, max_len: int, new: int = 1):
    """A batch of requests with these key counts over a random KV cache, the last `new` of each
    the batch's tokens (1: a decode; more: an extend)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = sum(lens) + 1
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen, device="cuda").bfloat16()
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen, device="cuda").bfloat16()
    table = torch.zeros(len(lens) + 1, max_len, dtype=torch.int32, device="cuda")
    start = 1  # slot 0: padding
    for r, n in enumerate(lens):
        table[r, :n] = torch.arange(start, start + n, device="cuda", dtype=torch.int32)
        start += n
    b = len(lens)
    reqs = np.arange(b)
    prefix = np.array(lens) - new
    out_slots = np.concatenate(
        [table[r, p : p + new].cpu().numpy() for r, p in zip(reqs, prefix, strict=True)]
    )
    extend = np.full(b, new, dtype=np.int64)
    fb = ForwardBatch.build(reqs, prefix, extend, out_slots, torch.device("cuda"))
    q = torch.randn(b * new, heads, dim, generator=gen, device="cuda").bfloat16()
    return q, (k_cache, v_cache), fb, table


def run_case(name: str, lens: list[int], floors: list[int], args, new: int = 1) -> list[dict]:
    q, kv, fb, table = decode_case(lens, args.heads, args.kv_heads, args.dim, args.max_len, new)
    spec = BackendSpec(args.heads, args.kv_heads, args.dim, max_batch=len(lens), device=q.device)
    scale = args.dim**-0.5
    rows = []
    default = create_backend("triton", spec, table)
    default.prepare_metadata(fb)
    us = graph_us(lambda: default.forward(q, None, None, kv, fb, scale), args.calls, args.replays)
    rows.append({"case": name, "what": "default (triton)", "us": us})
    before = kernels.MIN_GRID_SPLITS, kernels.BLOCK_N, kernels.SPLIT_TOKENS, kernels.NUM_WARPS
    for block_n, split, warps in args.schedules:
        kernels.BLOCK_N, kernels.SPLIT_TOKENS, kernels.NUM_WARPS = block_n, split, warps
        invariant = create_backend("triton_invariant", spec, table)  # scratch for these splits
        first = None
        for floor in floors:
            kernels.MIN_GRID_SPLITS = floor
            fn = lambda b=invariant: b.forward(q, None, None, kv, fb, scale)  # noqa: E731
            out = fn()
            same = first is None or torch.equal(out, first)
            first = out if first is None else first
            us = graph_us(fn, args.calls, args.replays)
            what = f"{block_n}/{split}/{warps}" + (f", floor {floor}" if new == 1 else "")
            rows.append({"case": name, "what": what, "us": us, "same": same})
    kernels.MIN_GRID_SPLITS, kernels.BLOCK_N, kernels.SPLIT_TOKENS, kernels.NUM_WARPS = before
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--heads", type=int, default=32)  # the 1B and 8B shapes
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--short", type=int, default=192, help="keys of each short request")
    p.add_argument("--long", type=int, default=32768, help="keys of the long request")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--floors", default="1,2,4,8,16")
    p.add_argument(
        "--schedules",
        default=f"{kernels.BLOCK_N}/{kernels.SPLIT_TOKENS}/{kernels.NUM_WARPS}",
        help="keys per block / keys per split / warps, comma-separated (a schedule's bits are "
        "its own: outputs are compared within one schedule)",
    )
    p.add_argument("--prefill", type=int, default=2048, help="an extend case of this many tokens")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.max_len = max(args.long, args.short, args.prefill) + 1
    floors = [int(f) for f in args.floors.split(",")]
    args.schedules = [tuple(int(v) for v in s.split("/")) for s in args.schedules.split(",")]
    rows = []
    for b in (int(b) for b in args.batches.split(",")):
        rows += run_case(f"{b} short", [args.short] * b, floors, args)
        long = [args.short] * (b - 1) + [args.long]
        rows += run_case(f"{b - 1} short + 1 long" if b > 1 else "1 long", long, floors, args)
    if args.prefill:
        rows += run_case(f"prefill {args.prefill}", [args.prefill], floors[:1], args, args.prefill)
    print(f"\ndecode attention, us per layer ({args.heads} heads, {args.kv_heads} KV heads, dim {args.dim})")  # fmt: skip
    for r in rows:
        same = "" if r.get("same", True) else "  OUTPUT DIFFERS"
        print(f"  {r['case']:<22} {r['what']:<26} {r['us']:8.1f}{same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
