"""Per-message cost of two builds of the P2P layer, paired in one pair of processes.

The `pipeserve.distributed` of a base build (a checkout of an earlier commit, `--base DIR`) is loaded
beside this checkout's under another package name, each build over its own gloo group, and the two
ping-pong the same two bf16 tensors in alternating blocks (with raw isend/irecv between), so that
both see the same machine load: on a shared 2-core machine, separate runs drift more than the
difference being measured. Per size: median one-way milliseconds of raw isend/irecv and of each
build, the overhead (build - raw) and the ratio of this build's overhead to the base's.

The first build created gets the first gloo group; that placement alone moved the overhead of two
copies of one build by up to 7% here, so run it with and without `--swap` and take both.

    python benchmark/p2p_ab.py --base /path/to/checkout-of-base [--swap] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from p2p_overlap import layer_one_way_ms
from pipeserve.distributed import GroupCoordinator
from pipeserve.utils import free_port

SIZES = ((1, 1024), (16, 1024), (256, 4096))
RAW_TAG = 1000
BASE_PACKAGE = "pipeserve_base"


def load_base(base: str, into: str) -> type:
    """The base build's GroupCoordinator, from a copy of its package renamed to BASE_PACKAGE."""
    src = pathlib.Path(base) / "python" / "pipeserve" / "distributed"
    dst = pathlib.Path(into) / BASE_PACKAGE / "distributed"
    dst.mkdir(parents=True, exist_ok=True)
    (dst.parent / "__init__.py").write_text("")
    for path in src.glob("*.py"):
        text = re.sub(
            r"\bpipeserve\.distributed\b", f"{BASE_PACKAGE}.distributed", path.read_text()
        )
        (dst / path.name).write_text(text)
    sys.path.insert(0, into)
    return importlib.import_module(f"{BASE_PACKAGE}.distributed.coordinator").GroupCoordinator


def raw_one_way_ms(group, barrier, payload: dict, me: int) -> float:
    bufs = [torch.empty_like(t) for t in payload.values()]
    recvs = [dist.irecv(b, 1 - me, group=group, tag=RAW_TAG) for b in bufs]
    barrier()
    start = time.perf_counter()
    if me == 1:
        _wait(recvs)
    _wait([dist.isend(t, 1 - me, group=group, tag=RAW_TAG) for t in payload.values()])
    if me == 0:
        _wait(recvs)
    return (time.perf_counter() - start) * 1e3 / 2


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _worker(rank: int, port: int, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = dist.new_group([0, 1], backend="gloo")
    groups = [dist.new_group([0, 1], backend="gloo") for _ in range(2)]
    if args.swap:
        groups.reverse()
    cpu = torch.device("cpu")
    base_cls = load_base(args.base, os.path.join(tmp, str(rank)))
    coords = {
        "base": base_cls([0, 1], groups[0], None, cpu, "base"),
        "this": GroupCoordinator([0, 1], groups[1], None, cpu, "this"),
    }

    def barrier() -> None:
        dist.barrier(group=world)

    rows = []
    for tokens, hidden in SIZES:
        payload = {k: torch.randn(tokens, hidden).bfloat16() for k in ("hidden_states", "residual")}
        times: dict[str, list[float]] = {"raw": [], "base": [], "this": []}
        for b in range(args.blocks + 1):  # block 0 warms up
            for name in ("base", "this") if b % 2 == 0 else ("this", "base"):
                block = [
                    layer_one_way_ms(coords[name], barrier, payload, rank)
                    for _ in range(args.block)
                ]
                times[name] += block if b else []
            raw = [
                raw_one_way_ms(groups[0], barrier, payload, rank) for _ in range(args.block // 2)
            ]
            times["raw"] += raw if b else []
        ms = {k: statistics.median(v) for k, v in times.items()}
        over = {k: ms[k] - ms["raw"] for k in ("base", "this")}
        rows.append(
            {
                "tokens": tokens,
                "hidden": hidden,
                "raw_ms": ms["raw"],
                "base_ms": ms["base"],
                "this_ms": ms["this"],
                "base_overhead_ms": over["base"],
                "this_overhead_ms": over["this"],
                "overhead_ratio": over["this"] / over["base"],
                "layer_ratio": ms["this"] / ms["base"],
            }
        )
    if rank == 1:
        with open(os.path.join(tmp, "rows.json"), "w") as f:
            json.dump(rows, f)
    barrier()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="checkout of the base build (has python/)")
    parser.add_argument("--blocks", type=int, default=30, help="timed blocks per build")
    parser.add_argument("--block", type=int, default=16, help="round trips per block")
    parser.add_argument("--swap", action="store_true", help="the base build on the second group")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(free_port(), args, tmp), nprocs=2, join=True)
        with open(os.path.join(tmp, "rows.json")) as f:
            rows = json.load(f)
    print(f"one way, median of {args.blocks * args.block} per build; swap={args.swap}")
    print(f"{'size':>13} {'raw_ms':>8} {'base_ms':>8} {'this_ms':>8} {'overhead':>14} {'ratio':>6}")
    for r in rows:
        over = f"{r['base_overhead_ms']:.3f}/{r['this_overhead_ms']:.3f}"
        print(
            f"{r['tokens']:>6}x{r['hidden']:<6} {r['raw_ms']:>8.3f} {r['base_ms']:>8.3f} "
            f"{r['this_ms']:>8.3f} {over:>14} {r['overhead_ratio']:>6.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
