"""Spawning, supervising and stopping the rank processes of one node.

Shutdown order: the front end asks stage 0 to stop (it drains, then sends a shutdown microbatch
around the ring, and every rank exits); after `grace_s` the launcher terminates, then kills, what is
left. A rank that dies first makes `check_alive` raise, and the group is torn down the same way.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import signal
import time
import weakref
from collections.abc import Iterable
from typing import Any

from pipeserve.config import EngineConfig, RankSpec
from pipeserve.frontend.main_guard import check_main_guard, spawnable_main
from pipeserve.frontend.stop_signals import signals_deferred
from pipeserve.ipc.sockets import IpcAddresses
from pipeserve.utils import free_port, usable_cores

logger = logging.getLogger("pipeserve.launcher")


class RankFailure(RuntimeError):
    """A rank process exited or reported an error."""


class RankGroup:
    def __init__(self, cfg: EngineConfig, ipc: IpcAddresses) -> None:
        check_main_guard()
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
        try:
            for local in range(cfg.ranks_per_node):
                spec = RankSpec(first + local, local, self.dist_init, ipc, threads)
                proc = ctx.Process(
                    target=_rank_main,
                    args=(cfg, spec, self.report),
                    name=f"pipeserve-rank{spec.rank}",
                    daemon=True,
                )
                with spawnable_main(), signals_deferred():
                    proc.start()
                    self.procs[spec.rank] = proc  # before a deferred StopSignal: it is stopped
        except BaseException:  # StopSignal, or a spawn that failed: none outlives the group
            terminate(self.procs.values())
            raise
        self.info: dict[str, Any] = {}
        self.exits: dict[int, tuple[float, int | None]] = {}  # rank: (when seen, exit code)
        self.errors: dict[int, str] = {}  # rank: the traceback it reported
        self.hurried_at: float | None = None  # `hurry`: stop's grace ends a second after this

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

    def sentinels(self) -> list[int]:
        """Descriptors that become readable when a local rank exits."""
        return [proc.sentinel for proc in self.procs.values()]

    def check_alive(self) -> None:
        """Raises RankFailure if any local rank has exited: its first line names the rank that
        died first (the others often die of it: a peer's P2P error), then every dead rank with
        its exit code; the ranks' reported tracebacks follow."""
        now = time.monotonic()
        for rank, proc in self.procs.items():
            if rank not in self.exits and not proc.is_alive():
                self.exits[rank] = (now, proc.exitcode)
        if self.exits:
            self._collect_errors()
            raise RankFailure(self.describe_failure())

    def describe_failure(self) -> str:
        # first seen first; among those seen together, one killed by a signal before one that
        # exited on its own (of the peer's death), then by rank
        order = sorted(self.exits, key=lambda r: (self.exits[r][0], self.exits[r][1] >= 0, r))
        parts = [self._describe_exit(rank) for rank in order]
        line = parts[0] + (f"; then {', '.join(parts[1:])}" if parts[1:] else "")
        tracebacks = [f"rank {r} reported:\n{self.errors[r]}" for r in order if r in self.errors]
        return "\n".join([line, *tracebacks])

    def _describe_exit(self, rank: int) -> str:
        code = self.exits[rank][1]
        if code is not None and code < 0:
            how = f"was killed by {_signal_name(-code)}"
        else:
            how = f"exited with code {code}"
        error = self.errors.get(rank, "").strip().splitlines()
        return f"rank {rank} ({self.procs[rank].name}) {how}" + (f" ({error[-1]})" if error else "")

    def _collect_errors(self) -> None:
        """Takes the ranks' error reports off the queue (a rank reports before it exits)."""
        try:
            while True:
                kind, rank, payload = self.report.get_nowait()
                if kind == "error" and payload:
                    self.errors.setdefault(rank, str(payload))
        except (queue.Empty, OSError, ValueError):  # ValueError: the queue is closed
            return

    def hurry(self) -> None:
        """Cuts `stop`'s grace (also one under way) to a second from now; safe in a signal handler."""
        self.hurried_at = time.monotonic()

    def _grace_over(self, deadline: float) -> bool:
        now = time.monotonic()
        return now >= deadline or (self.hurried_at is not None and now >= self.hurried_at + 1.0)

    def stop(self, grace_s: float = 10.0) -> None:
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            while proc.is_alive() and not self._grace_over(deadline):
                proc.join(0.05)
        terminate(self.procs.values())
        self.ipc.cleanup()
        self.report.close()
        self.report.join_thread()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_stopped: weakref.WeakSet = weakref.WeakSet()  # every process `terminate` has been given


def terminate(procs: Iterable[Any]) -> None:
    """Terminates the processes still alive; kills those that outlive two more seconds, all at
    once (one by one, a rank would see its peer die first and report a failure of its own)."""
    procs = list(procs)
    _stopped.update(procs)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(2.0)


def never_stopped(procs: Iterable[Any]) -> list[Any]:
    """Those of `procs` that no `terminate` was given (one that was may still be dying: a killed
    GPU process can take seconds to give its memory back)."""
    return [p for p in procs if p not in _stopped]


def _rank_main(cfg: EngineConfig, spec: RankSpec, report: Any) -> None:
    """The spawned process's entry: the rank side (torch and all) is imported there only. Ctrl-C
    reaches a terminal's whole process group, but the parent owns it (it drains, or unwinds an
    Engine's start, and stops the ranks): ignored from here on, so that a rank cut short while
    importing torch leaves no traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pipeserve.stage.main import run_rank

    run_rank(cfg, spec, report)
