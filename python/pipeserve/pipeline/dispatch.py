"""Event-driven dispatch: `max_concurrency` workers per endpoint take cells from the frontier.

A worker that frees up takes the best ready cell of its lane at that moment (with, for a
completions column, up to `max_batch_size - 1` more ready cells of the same column, sent in the
same request); when its lane is empty it sleeps on the lane's event, which `_resolve` sets as
soon as a completion makes a cell of that lane ready. A column may list several endpoints: a
cell goes to whichever of them has a free worker first. An endpoint whose last attempt could not
connect is down for the rest of the run: its cells go to the column's other endpoints, and a
column with none left fails its cells at once (a re-run retries them). No loop walks a list of ready cells while
waiting for a slot, so a judge cell that becomes ready is taken by the next free judge worker,
whatever else is queued. Python cells run inline as soon as they are ready.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pipeserve.pipeline.client import Answer, CellError, EndpointDown
from pipeserve.pipeline.config import Job, LLMColumn, PythonColumn
from pipeserve.pipeline.frontier import PYTHON_LANE, Cell, Frontier
from pipeserve.pipeline.stats import RequestSpan, RunStats
from pipeserve.pipeline.template import render

# (column, prompts, priority) -> a text or a CellError per prompt (see client.EndpointClient)
Generate = Callable[[LLMColumn, list[str], int], Awaitable[Answer]]


class Dispatcher:
    def __init__(
        self,
        job: Job,
        frontier: Frontier,
        generate: dict[str, Generate],  # by endpoint name
        stats: RunStats,
        on_record: Callable[[int], None],  # a record finished; called once per record
        down: dict[str, str] | None = None,  # endpoints known to be down: name -> why
    ) -> None:
        self._job = job
        self._frontier = frontier
        self._generate = generate
        self._stats = stats
        self._on_record = on_record
        self._wake = {lane: asyncio.Event() for lane in frontier.lanes}
        self._finished = asyncio.Event()
        self._failure: BaseException | None = None
        self._down = dict(down or {})
        self._batch_limit = {  # lane -> column -> prompts per request
            e.name: {
                c.name: e.max_batch_size if c.api == "completions" else 1
                for c in job.columns
                if isinstance(c, LLMColumn) and e.name in c.endpoints
            }
            for e in job.endpoints
        }

    async def run(self) -> None:
        self._settle()
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
            while not self._frontier.done and lane not in self._down:
                cells = self._frontier.pop_batch(lane, self._batch_limit[lane])
                if not cells:
                    self._wake[lane].clear()
                    await self._wake[lane].wait()
                    continue
                outcomes = await self._call(lane, cells)
                for cell, outcome in zip(cells, outcomes, strict=True):
                    if isinstance(outcome[1], EndpointDown):
                        self._down.setdefault(lane, str(outcome[1]))
                        self._wake[lane].set()  # the lane's other workers stop too
                        self._push_again(cell)
                    else:
                        self._resolve(cell, *outcome)
                self._settle()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in the runner or a callback: stop the run, loudly
            self._failure = e
            self._finished.set()

    async def _call(self, lane: str, cells: list[Cell]) -> list[tuple[Any, Any]]:
        """One request to `lane` for cells of one LLM column: (value, error) per cell, the error
        a message or, where the endpoint went down, the `EndpointDown`."""
        column = self._job.column(cells[0].column)
        assert isinstance(column, LLMColumn)
        outcomes: list[tuple[Any, Any]] = []
        prompts: dict[int, str] = {}  # by position in `cells`
        for i, cell in enumerate(cells):
            try:
                prompts[i] = render(column.prompt, self._frontier.row(cell))
                outcomes.append((None, None))
            except (ValueError, TypeError) as e:  # a format spec that does not fit the value
                outcomes.append((None, f"cannot render the prompt: {type(e).__name__}: {e}"))
        if not prompts:
            return outcomes
        start = self._stats.now()
        answer = await self._generate[lane](
            column, list(prompts.values()), self._job.graph.priority[column.name]
        )
        end = self._stats.now()
        for i, text in zip(prompts, answer.texts, strict=True):
            outcomes[i] = (text, None) if not isinstance(text, CellError) else (None, _error(text))
        spans = [
            RequestSpan(column.name, lane, cells[i].record, start, end, outcomes[i][1] is None)
            for i in prompts
        ]
        self._stats.request(spans, answer.prompt_tokens, answer.completion_tokens)
        return outcomes

    def _settle(self) -> None:
        """After cells resolved: runs the Python cells that became ready, hands out the records
        that finished, and ends the run when nothing is left."""
        while self._run_python() | self._fail_unserved():
            pass
        self._drain()
        if self._frontier.done:
            self._finished.set()
            for event in self._wake.values():
                event.set()

    def _resolve(self, cell: Cell, value: Any, error: str | None) -> None:
        for ready in self._frontier.resolve(cell, value, error):
            for lane in self._frontier.lanes_of(ready.column):
                self._wake[lane].set()

    def _push_again(self, cell: Cell) -> None:
        """A cell whose endpoint went down: back to its column's queue for another endpoint."""
        self._frontier.push_again(cell)
        for lane in self._frontier.lanes_of(cell.column):
            self._wake[lane].set()

    def _fail_unserved(self) -> bool:
        """Fails the ready cells of columns whose endpoints are all down; True if any."""
        failed = False
        for column in self._job.columns:
            lanes = self._frontier.lanes_of(column.name)
            if not all(lane in self._down for lane in lanes):
                continue
            why = f"endpoint {lanes[-1]!r} is down: {self._down[lanes[-1]]}"
            while (cell := self._frontier.pop_column(column.name)) is not None:
                self._resolve(cell, None, why)
                failed = True
        return failed

    def _run_python(self) -> bool:
        """Runs the ready Python cells; True if any."""
        ran = False
        while (cell := self._frontier.pop(PYTHON_LANE)) is not None:
            column = self._job.column(cell.column)
            assert isinstance(column, PythonColumn)
            self._resolve(cell, *_call_python(column, self._frontier.row(cell)))
            ran = True
        return ran

    def _drain(self) -> None:
        resolved, completed = self._frontier.resolved, self._frontier.completed
        for cell, ok in resolved:
            self._stats.cell(cell.column, ok)
        resolved.clear()
        while completed:
            self._on_record(completed.pop(0))


def _error(e: CellError) -> str | EndpointDown:
    return e if isinstance(e, EndpointDown) else str(e)


def _call_python(column: PythonColumn, row: dict[str, Any]) -> tuple[Any, str | None]:
    try:
        value = column.function(row)
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: close it so that it does not warn
            raise TypeError("a Python column's function must return a value, not an awaitable")
        json.dumps(value)
    except Exception as e:  # the user's function: its failure is this cell's error
        return None, f"{type(e).__name__}: {e}"
    return value, None
