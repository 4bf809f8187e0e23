"""Spawning, supervising and stopping the rank processes of one node.

Shutdown order: the front end asks stage 0 to stop (it drains, then sends a shutdown microbatch
around the ring, and every rank exits); after `grace_s` the launcher terminates, then kills, what is
left. A rank that dies first makes `check_alive` raise, and the group is torn down the same way.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
from typing import Any

from pipeserve.config import EngineConfig
from pipeserve.engine.ipc import IpcAddresses
from pipeserve.engine.worker import RankSpec, run_rank
from pipeserve.utils import free_port, usable_cores

logger = logging.getLogger("pipeserve.launcher")


class RankFailure(RuntimeError):
    """A rank process exited or reported an error."""


class RankGroup:
    def __init__(self, cfg: EngineConfig, ipc: IpcAddresses) -> None:
        self.cfg = cfg
        self.ipc = ipc
        ctx = mp.get_context("spawn")
        self.report = ctx.Queue()
        self.dist_init = (
            f"tcp://{cfg.dist_init_addr}"
            if cfg.dist_init_addr
            else f"tcp://127.0.0.1:{free_port()}"
        )
        first = cfg.node_rank * cfg.ranks_per_node
        threads = cfg.cpu_threads or max(1, usable_cores() // cfg.ranks_per_node)
        self.procs: dict[int, Any] = {}
        for local in range(cfg.ranks_per_node):
            spec = RankSpec(first + local, local, self.dist_init, ipc, threads)
            proc = ctx.Process(
                target=run_rank,
                args=(cfg, spec, self.report),
                name=f"pipeserve-rank{spec.rank}",
                daemon=True,
            )
            proc.start()
            self.procs[spec.rank] = proc
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        """Blocks until every local rank reports ready (at most `ready_timeout_s`), logging their
        progress; raises RankFailure."""
        pending = set(self.procs)
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while pending:
            kind, rank, payload = self._next_report(deadline)
            if kind == "progress":
                logger.info("rank %d: %s", rank, payload)
            elif kind == "ready":
                pending.discard(rank)
                self.info = payload
            else:
                raise RankFailure(f"rank {rank} failed while starting:\n{payload}")
        return self.info

    def _next_report(self, deadline: float) -> tuple[str, int, Any]:
        while True:
            try:
                return self.report.get(timeout=0.5)
            except queue.Empty:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RankFailure(
                        f"ranks did not become ready within {self.cfg.ready_timeout_s:g}s "
                        "(ready_timeout_s, --ready-timeout)"
                    ) from None

    def check_alive(self) -> None:
        for rank, proc in self.procs.items():
            if not proc.is_alive():
                raise RankFailure(
                    f"rank {rank} ({proc.name}) exited with code {proc.exitcode}{self._reported_error()}"
                )

    def _reported_error(self) -> str:
        try:
            while True:
                kind, _rank, payload = self.report.get_nowait()
                if kind == "error":
                    return f"; it reported:\n{payload}"
        except queue.Empty:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self.ipc.cleanup()
        self.report.close()
        self.report.join_thread()
