"""Runs a function on every rank of a real pp x tp grid: spawned processes on 127.0.0.1, gloo
(and NCCL, one GPU per rank, with device="cuda")."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

from pipeserve.utils import free_port


def _child(
    fn: Callable, rank: int, pp: int, tp: int, port: int, args: tuple, out: Any, device: str
) -> None:
    import torch

    from pipeserve.distributed import DistConfig, destroy_distributed, init_distributed

    torch.set_num_threads(1)
    try:
        init_distributed(
            DistConfig(
                pp_size=pp,
                tp_size=tp,
                rank=rank,
                init_method=f"tcp://127.0.0.1:{port}",
                device=device,
                local_rank=rank,
            )
        )
        result = fn(rank, *args)
        out.put((rank, "ok", result))
        destroy_distributed()
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    out.close()
    out.join_thread()  # the report must leave before os._exit ends the queue's feeder thread
    os._exit(0)  # skip interpreter teardown: nothing left to flush, and it keeps exits prompt


def run_ranks(
    fn: Callable,
    pp: int = 2,
    tp: int = 1,
    args: tuple = (),
    timeout: float = 60.0,
    may_die: frozenset[int] = frozenset(),
    device: str = "cpu",
) -> dict[int, Any]:
    """Returns {rank: fn's result}. Fails on any rank's exception or a timeout; ranks in `may_die`
    may exit without reporting."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, pp, tp, port, args, out, device), daemon=True)
        for r in range(pp * tp)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    need = pp * tp - len(may_die)
    try:
        while len(results) + len(errors) < need:
            try:
                rank, status, value = out.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"ranks timed out after {timeout}s; reported: {sorted(results)}"
                ) from None
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results
