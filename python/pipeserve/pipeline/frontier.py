"""The ready frontier: every cell whose inputs are all resolved and that has not been taken yet,
kept incrementally in one priority queue per column. A lane (an endpoint, or `PYTHON_LANE`)
serves the queues of the columns that may run on it.

Resolving a cell moves each dependent whose last input it was into its queue at once, so a worker
that takes a cell always sees the current frontier, never a stale snapshot. A lane takes the best
head of its queues by `(-depth, record, column position)`: deeper columns first (records already
under way finish and stream out before new ones start), then earlier records, then declaration
order. The key depends only on the job and the input, so ties are broken the same way on every
run. A batch continues in the first cell's own queue, so columns that share a lane at one depth
(several judges on one server) still fill their batches.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipeserve.pipeline.job.config import Job, LLMColumn

PYTHON_LANE = "<python>"  # not an identifier, so no endpoint has this name


class Cell(NamedTuple):
    record: int  # position of the record in the input
    column: str


@dataclass
class RecordPlan:
    """What to do for one record: `values` holds its fields and any column values kept from an
    earlier run; `run` names the columns still to compute (closed under dependents)."""

    position: int
    values: dict[str, Any]
    run: set[str]


@dataclass
class _RecordState:
    values: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)  # column -> inputs not yet resolved
    open_cells: int = 0
    generations: dict[str, int] = field(default_factory=dict)  # column -> generations so far
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)  # LLM column -> tokens, ...


class Frontier:
    def __init__(self, job: Job, plans: Iterable[RecordPlan]) -> None:
        self._job = job
        self._graph = job.graph
        self._columns = [c.name for c in job.columns]
        self._lanes = {
            c.name: c.endpoints if isinstance(c, LLMColumn) else (PYTHON_LANE,) for c in job.columns
        }
        self._queues: dict[str, list[tuple[int, int, int]]] = {n: [] for n in self._columns}
        self._served: dict[str, list[list[tuple[int, int, int]]]] = {
            lane: [] for lane in (*(e.name for e in job.endpoints), PYTHON_LANE)
        }
        for name, lanes in self._lanes.items():
            for lane in lanes:
                self._served[lane].append(self._queues[name])
        self._records: dict[int, _RecordState] = {}
        self._open_records = 0
        # Logs the caller drains: cells resolved (with success) and records finished.
        self.resolved: list[tuple[Cell, bool]] = []
        self.completed: list[int] = []
        for plan in plans:
            self._add(plan)

    def _add(self, plan: RecordPlan) -> None:
        state = _RecordState(dict(plan.values), open_cells=len(plan.run))
        self._records[plan.position] = state
        self._open_records += bool(plan.run)
        for name in plan.run:
            state.waiting[name] = sum(1 for i in set(self._graph.inputs[name]) if i in plan.run)
            if state.waiting[name] == 0:
                self._push(Cell(plan.position, name))

    def _push(self, cell: Cell) -> None:
        key = (-self._graph.depth[cell.column], cell.record, self._graph.position[cell.column])
        heapq.heappush(self._queues[cell.column], key)

    @property
    def lanes(self) -> tuple[str, ...]:
        return tuple(sorted(self._served))

    @property
    def done(self) -> bool:
        """Every cell of every record is resolved."""
        return self._open_records == 0

    def ready(self, lane: str) -> int:
        return sum(len(q) for q in self._served[lane])

    def pop(self, lane: str) -> Cell | None:
        """Takes the first ready cell of `lane`; the caller must `resolve` it later."""
        heads = [q for q in self._served[lane] if q]
        if not heads:
            return None
        _, record, column = heapq.heappop(min(heads, key=lambda q: q[0]))
        return Cell(record, self._columns[column])

    def pop_column(self, column: str) -> Cell | None:
        queue = self._queues[column]
        return Cell(heapq.heappop(queue)[1], column) if queue else None

    def pop_batch(self, lane: str, limit: Mapping[str, int]) -> list[Cell]:
        """The first ready cell of `lane` and more ready cells of its column in queue order, up
        to `limit[column]` cells in all (what is ready now: it never waits)."""
        first = self.pop(lane)
        if first is None:
            return []
        batch, queue = [first], self._queues[first.column]
        while len(batch) < limit[first.column] and queue:
            batch.append(Cell(heapq.heappop(queue)[1], first.column))
        return batch

    def push_again(self, cell: Cell, regenerate: bool = False) -> None:
        """Puts a taken cell back, for another endpoint or (`regenerate`) another generation;
        it stays open."""
        if regenerate:
            generations = self._records[cell.record].generations
            generations[cell.column] = generations.get(cell.column, 1) + 1
        self._push(cell)

    def generation(self, cell: Cell) -> int:
        """Which generation of the cell this is (1 for the first)."""
        return self._records[cell.record].generations.get(cell.column, 1)

    def regenerate(self, target: Cell, validator: Cell) -> bool:
        """A validator (taken, not resolved) rejected `target`'s value: `target` is open again,
        queued for its next generation, and the validator waits for it. True when `target` had
        been resolved in this run (rather than kept from an earlier one)."""
        state = self._records[target.record]
        counted = target.column in state.waiting
        del state.values[target.column]
        state.open_cells += 1
        state.waiting[validator.column] = 1  # its other inputs are resolved: it was taken
        for name in self._graph.dependents[target.column]:
            if name != validator.column and state.waiting.get(name, 0) > 0:
                state.waiting[name] += 1  # waits for the validator, so it is not released yet
        self.push_again(target, regenerate=True)
        return counted

    def add_usage(self, cell: Cell, usage: Mapping[str, Any]) -> None:
        """Adds a generation's tokens to the cell's usage; other keys keep the latest value."""
        mine = self._records[cell.record].usage.setdefault(cell.column, {})
        for key, value in usage.items():
            mine[key] = mine.get(key, 0) + value if key.endswith("_tokens") else value

    def lanes_of(self, column: str) -> tuple[str, ...]:
        return self._lanes[column]

    def row(self, cell: Cell) -> dict[str, Any]:
        """What a cell may read: the record's fields and the values of its input columns."""
        values = self._records[cell.record].values
        row = {k: v for k, v in values.items() if k not in self._lanes}
        row.update({n: values[n] for n in self._graph.inputs[cell.column]})
        return row

    def resolve(self, cell: Cell, value: Any = None, error: str | None = None) -> list[Cell]:
        """Records a cell's value (or its error) and returns the cells that became ready, which are
        already in their lanes. A cell whose input failed is not run: it fails at once, naming
        that input, and so do the cells below it."""
        state = self._records[cell.record]
        if error is None:
            state.values[cell.column] = value
        else:
            state.errors[cell.column] = error
        self.resolved.append((cell, error is None))
        state.open_cells -= 1
        if state.open_cells == 0:  # only the record's last cell gets here (dependents are open)
            self._open_records -= 1
            self.completed.append(cell.record)
        ready: list[Cell] = []
        for name in self._graph.dependents[cell.column]:
            if name not in state.waiting:
                continue
            state.waiting[name] -= 1
            if state.waiting[name] == 0:
                ready.extend(self._release(Cell(cell.record, name), state))
        return ready

    def _release(self, cell: Cell, state: _RecordState) -> list[Cell]:
        failed = [i for i in self._graph.inputs[cell.column] if i in state.errors]
        if failed:
            return self.resolve(cell, error=f"not run: input column {failed[0]!r} failed")
        self._push(cell)
        return [cell]

    def result(self, record: int) -> tuple[dict[str, Any], dict[str, str]]:
        """A finished record's values (fields and columns) and its per-column errors."""
        state = self._records[record]
        return state.values, state.errors

    def usage(self, record: int) -> dict[str, dict[str, Any]]:
        """A record's usage by LLM column: tokens, finish_reason, generations."""
        return self._records[record].usage

    def forget(self, record: int) -> None:
        """Drops a finished record's state once its output is written."""
        del self._records[record]
