"""Event-driven dispatch: `max_concurrency` workers per endpoint take cells from the frontier.

A worker that frees up takes the best ready cell of its lane at that moment; when its lane is
empty it sleeps on the lane's event, which `_settle` sets as soon as a completion makes a cell of
that lane ready. No loop walks a list of ready cells while waiting for a slot, so a judge cell
that becomes ready is taken by the next free judge worker, whatever else is queued. Python cells
run inline as soon as they are ready.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pipeserve.pipeline.client import CellError, Completion
from pipeserve.pipeline.config import Job, LLMColumn, PythonColumn
from pipeserve.pipeline.frontier import PYTHON_LANE, Cell, Frontier
from pipeserve.pipeline.stats import RequestSpan, RunStats
from pipeserve.pipeline.template import render

# (column, prompt, priority) -> the completion, or CellError once it has failed for good
Generate = Callable[[LLMColumn, str, int], Awaitable[Completion]]


class Dispatcher:
    def __init__(
        self,
        job: Job,
        frontier: Frontier,
        generate: dict[str, Generate],  # by endpoint name
        stats: RunStats,
        on_record: Callable[[int], None],  # a record finished; called once per record
    ) -> None:
        self._job = job
        self._frontier = frontier
        self._generate = generate
        self._stats = stats
        self._on_record = on_record
        self._wake = {lane: asyncio.Event() for lane in frontier.lanes}
        self._finished = asyncio.Event()
        self._failure: BaseException | None = None

    async def run(self) -> None:
        self._run_python()
        self._drain()
        if self._frontier.done:
            return
        workers = [
            asyncio.create_task(self._worker(e.name), name=f"pipeline-{e.name}-{i}")
            for e in self._job.endpoints
            for i in range(e.max_concurrency)
        ]
        try:
            await self._finished.wait()
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if self._failure is not None:
            raise self._failure

    async def _worker(self, lane: str) -> None:
        try:
            while not self._frontier.done:
                cell = self._frontier.pop(lane)
                if cell is None:
                    self._wake[lane].clear()
                    await self._wake[lane].wait()
                    continue
                value, error = await self._call(cell)
                self._settle(cell, value, error)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in the runner or a callback: stop the run, loudly
            self._failure = e
            self._finished.set()

    async def _call(self, cell: Cell) -> tuple[Any, str | None]:
        column = self._job.column(cell.column)
        assert isinstance(column, LLMColumn)
        priority = self._job.graph.priority[column.name]
        prompt = render(column.prompt, self._frontier.row(cell))
        start = self._stats.now()
        try:
            out = await self._generate[column.endpoint](column, prompt, priority)
        except CellError as e:
            self._trace(cell, column, start, ok=False)
            return None, str(e)
        self._trace(cell, column, start, ok=True, out=out)
        return out.text, None

    def _trace(
        self, cell: Cell, column: LLMColumn, start: float, ok: bool, out: Completion | None = None
    ) -> None:
        span = RequestSpan(column.name, column.endpoint, cell.record, start, self._stats.now(), ok)
        tokens = (out.prompt_tokens, out.completion_tokens) if out else (0, 0)
        self._stats.request(span, *tokens)

    def _settle(self, cell: Cell, value: Any, error: str | None) -> None:
        """Resolves a cell, wakes the lanes that gained cells, runs Python cells, and hands out
        the records that finished."""
        self._resolve(cell, value, error)
        self._run_python()
        self._drain()
        if self._frontier.done:
            self._finished.set()
            for event in self._wake.values():
                event.set()

    def _resolve(self, cell: Cell, value: Any, error: str | None) -> None:
        for ready in self._frontier.resolve(cell, value, error):
            self._wake[self._frontier.lane_of(ready.column)].set()

    def _run_python(self) -> None:
        while (cell := self._frontier.pop(PYTHON_LANE)) is not None:
            column = self._job.column(cell.column)
            assert isinstance(column, PythonColumn)
            self._resolve(cell, *_call_python(column, self._frontier.row(cell)))

    def _drain(self) -> None:
        resolved, completed = self._frontier.resolved, self._frontier.completed
        for cell, ok in resolved:
            self._stats.cell(cell.column, ok)
        resolved.clear()
        while completed:
            self._on_record(completed.pop(0))


def _call_python(column: PythonColumn, row: dict[str, Any]) -> tuple[Any, str | None]:
    try:
        value = column.function(row)
        if inspect.isawaitable(value):
            raise TypeError("a Python column's function must return a value, not an awaitable")
        json.dumps(value)
    except Exception as e:  # the user's function: its failure is this cell's error
        return None, f"{type(e).__name__}: {e}"
    return value, None
