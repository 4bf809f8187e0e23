"""CPU time of a process tree, read from /proc (Linux only).

`take(root)` snapshots every process descended from `root` (walking the ppid of /proc/*/stat);
`usage(before, after, wall_s)` turns two snapshots into per-process CPU over the interval. A process
that started in between counts from zero; one that exited in between is missing from `after` and
its CPU is lost (the kernel credits it to its parent only once reaped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
RANK_PREFIX = "pipeserve-rank"


@dataclass(frozen=True)
class ProcTime:
    pid: int
    name: str
    cpu_s: float  # utime + stime, all threads


@dataclass(frozen=True)
class ProcUsage:
    pid: int
    name: str
    cpu_s: float
    cpu_pct: float  # of one core over the interval

    @property
    def is_rank(self) -> bool:
        return self.name.startswith(RANK_PREFIX)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after `(comm)`: [0] state, [1] ppid, [11] utime, [12] stime (proc(5) 3.. 15)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parents() -> dict[int, int]:
    """pid -> ppid of every process now running."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            out[int(entry)] = int(fields[1])
    return out


def descendants(root: int) -> list[int]:
    """`root` and every process below it, root first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(sorted(children.get(pid, []), reverse=True))
    return tree


def process_name(pid: int) -> str:
    """A process's title (`pipeserve-rank0`, set by setproctitle or prctl), else what it runs:
    the module of `python -m`, `resource_tracker`, or the kernel's comm."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/cmdline") as f:
            argv = [a for a in f.read().split("\0") if a]
    except OSError:
        return "(gone)"
    if comm.startswith("pipeserve") and argv:
        return argv[0].strip()
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    if any("resource_tracker" in a for a in argv):
        return "resource_tracker"
    return comm


def take(root: int) -> dict[int, ProcTime]:
    snap = {}
    for pid in descendants(root):
        if (fields := _stat_fields(pid)) is not None and fields[0] != "Z":
            cpu = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
            snap[pid] = ProcTime(pid, process_name(pid), cpu)
    return snap


def usage(
    before: dict[int, ProcTime], after: dict[int, ProcTime], wall_s: float
) -> list[ProcUsage]:
    out = []
    for pid, now in after.items():
        cpu = now.cpu_s - (before[pid].cpu_s if pid in before else 0.0)
        out.append(ProcUsage(pid, now.name, cpu, 100.0 * cpu / wall_s))
    return out


def self_cpu_s() -> float:
    """This process's utime + stime, all threads (what `usage` reads for a server process)."""
    t = os.times()
    return t.user + t.system
