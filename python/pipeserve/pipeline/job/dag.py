"""The column graph of a job: which columns each column reads, in what order they can run, how
deep each sits, and which request priority each LLM column sends.

A validator of column T is an input of every other column that reads T, so nothing reads T's
cell before T's validators accepted it (a rejected cell is generated again in place)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeserve.pipeline.job.config import JobError, LLMColumn, PythonColumn

if TYPE_CHECKING:
    from pipeserve.pipeline.job.config import Job


@dataclass(frozen=True)
class JobGraph:
    order: tuple[str, ...]  # topological; ties broken by declaration order
    position: Mapping[str, int]  # declaration order
    inputs: Mapping[str, tuple[str, ...]]  # the columns each column reads
    dependents: Mapping[str, tuple[str, ...]]  # the columns that read each column
    field_refs: Mapping[str, tuple[str, ...]]  # the record fields each LLM column's prompt reads
    depth: Mapping[str, int]  # longest input path from a column that reads no column
    priority: Mapping[str, int]  # request priority of each LLM column; lower is served earlier

    def downstream(self, names: set[str]) -> set[str]:
        """`names` and every column that reads one of them, directly or not."""
        out, stack = set(names), list(names)
        while stack:
            for d in self.dependents[stack.pop()]:
                if d not in out:
                    out.add(d)
                    stack.append(d)
        return out


def build_graph(job: Job) -> JobGraph:
    names = [c.name for c in job.columns]
    _check_unique(names, "column")
    _check_unique([e.name for e in job.endpoints], "endpoint")
    if not names:
        raise JobError("the job has no columns")
    endpoints = sorted(e.name for e in job.endpoints)
    inputs, field_refs = {}, {}
    for col in job.columns:
        if isinstance(col, LLMColumn):
            for unknown in (e for e in col.endpoints if e not in endpoints):
                raise JobError(
                    f"column {col.name!r} uses endpoint {unknown!r}, which is not defined "
                    f"(endpoints: {', '.join(endpoints) or 'none'})"
                )
            inputs[col.name] = tuple(n for n in col.inputs if n in names)
            field_refs[col.name] = tuple(n for n in col.inputs if n not in names)
            _check_fields(job, col.name, field_refs[col.name], names)
        else:
            unknown = [n for n in col.inputs if n not in names]
            if unknown:
                raise JobError(
                    f"column {col.name!r} lists input {unknown[0]!r}, which is not a column "
                    f"(columns: {', '.join(names)})"
                )
            inputs[col.name] = col.inputs
            field_refs[col.name] = ()
    inputs = _wait_for_validators(job, inputs)
    position = {n: i for i, n in enumerate(names)}
    dependents = {n: tuple(d for d in names if n in inputs[d]) for n in names}
    order = _topological_order(names, inputs, dependents, position)
    depth: dict[str, int] = {}
    for n in order:
        depth[n] = max((depth[i] + 1 for i in inputs[n]), default=0)
    return JobGraph(order, position, inputs, dependents, field_refs, depth, _priorities(job, depth))


def _wait_for_validators(
    job: Job, inputs: dict[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    validators: dict[str, list[str]] = {}
    for col in job.columns:
        if isinstance(col, PythonColumn) and col.validates is not None:
            target = next((c for c in job.columns if c.name == col.validates), None)
            if not isinstance(target, LLMColumn):
                raise JobError(
                    f"column {col.name!r} validates {col.validates!r}, which is not an LLM column"
                )
            if col.validates in validators:
                raise JobError(
                    f"columns {validators[col.validates][0]!r} and {col.name!r} both validate "
                    f"{col.validates!r}: one validator per column (combine the checks)"
                )
            validators[col.validates] = [col.name]
    out = {}
    for name, reads in inputs.items():
        extra = [
            v for r in reads if name not in validators.get(r, []) for v in validators.get(r, [])
        ]
        out[name] = (*reads, *(v for v in dict.fromkeys(extra) if v not in reads))
    return out


def _priorities(job: Job, depth: Mapping[str, int]) -> dict[str, int]:
    """Explicit priorities stay; the rest count down with depth so that the deepest LLM column
    gets 0 and is served first by a server that schedules lower priority values earlier."""
    llm = [c for c in job.columns if isinstance(c, LLMColumn)]
    deepest = max((depth[c.name] for c in llm), default=0)
    return {c.name: c.priority if c.priority is not None else deepest - depth[c.name] for c in llm}


def _check_unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise JobError(f"two {what}s are named {n!r}")
        seen.add(n)


def _check_fields(job: Job, column: str, refs: tuple[str, ...], names: list[str]) -> None:
    if job.fields is None:
        return
    for ref in refs:
        if ref not in job.fields:
            raise JobError(
                f"column {column!r}: its prompt uses {{{ref}}}, which is neither a column "
                f"({', '.join(names)}) nor a declared field ({', '.join(job.fields) or 'none'})"
            )


def _topological_order(
    names: list[str],
    inputs: Mapping[str, tuple[str, ...]],
    dependents: Mapping[str, tuple[str, ...]],
    position: Mapping[str, int],
) -> tuple[str, ...]:
    waiting = {n: len(set(inputs[n])) for n in names}
    ready = [position[n] for n in names if waiting[n] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for d in dependents[name]:
            waiting[d] -= 1
            if waiting[d] == 0:
                heapq.heappush(ready, position[d])
    if len(order) < len(names):
        left = [n for n in names if n not in order]
        raise JobError(f"the columns form a cycle: {' -> '.join(_find_cycle(left, inputs))}")
    return tuple(order)


def _find_cycle(left: list[str], inputs: Mapping[str, tuple[str, ...]]) -> list[str]:
    """A cycle among `left` (columns that never became ready), as a closed path. Every column
    there has an input in `left`, so walking inputs from any of them must revisit one."""
    path, seen = [left[0]], {left[0]: 0}
    while True:
        nxt = next(i for i in inputs[path[-1]] if i in left)
        if nxt in seen:
            return list(reversed([*path[seen[nxt] :], nxt]))
        seen[nxt] = len(path)
        path.append(nxt)
