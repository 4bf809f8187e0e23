"""Event-driven dispatch: `max_concurrency` workers per endpoint take cells from the frontier.

A worker that holds one of its endpoint's request slots (`AdaptiveLimit`) takes the best ready
cell of its lane at that moment (with, for a completions column, up to `max_batch_size - 1` more
ready cells of the same column, sent in the same request); when its lane is empty it sleeps on
the lane's event, which `_resolve` sets as soon as a completion makes a cell of that lane ready.
No loop walks a list of ready cells while waiting for a slot, so a judge cell that becomes ready
is taken by the next free judge worker, whatever else is queued. Python cells run inline as soon
as they are ready.

A column may list several endpoints: a cell goes to whichever of them has a free worker first.
An endpoint whose last attempt could not connect is down for the rest of the run: its cells go
to the column's other endpoints, and a column with none left fails its cells at once. An answer
that does not fit a structured column, or that its validator rejects, is queued again for
another generation, within the column's `max_generations`. When too many of the latest cells
failed (`StopPolicy`), or `stop` is called, the run ends without writing unfinished records.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from pipeserve.pipeline.cells import (
    RENDER_ERRORS,
    Outcome,
    llm_outcome,
    prompt,
    python_value,
    rejection,
)
from pipeserve.pipeline.endpoint.client import Answer, EndpointDown, Prompt
from pipeserve.pipeline.endpoint.limit import AdaptiveLimit
from pipeserve.pipeline.frontier import PYTHON_LANE, Cell, Frontier
from pipeserve.pipeline.job.config import Job, LLMColumn, PythonColumn
from pipeserve.pipeline.stats import RequestSpan, RunStats

# (column, prompts, priority) -> a Generation or a CellError per prompt (see EndpointClient)
Generate = Callable[[LLMColumn, list[Prompt], int], Awaitable[Answer]]


class Dispatcher:
    def __init__(
        self,
        job: Job,
        frontier: Frontier,
        generate: dict[str, Generate],  # by endpoint name
        stats: RunStats,
        on_record: Callable[[int], None],  # a record finished; called once per record
        down: dict[str, str] | None = None,  # endpoints known to be down: name -> why
        limits: dict[str, AdaptiveLimit] | None = None,  # default: fixed at max_concurrency
    ) -> None:
        self._job = job
        self._frontier = frontier
        self._generate = generate
        self._stats = stats
        self._on_record = on_record
        self._down = dict(down or {})
        self._limits = {
            e.name: (limits or {}).get(e.name) or AdaptiveLimit(e.max_concurrency, False)
            for e in job.endpoints
        }
        self._wake = {lane: asyncio.Event() for lane in frontier.lanes}
        self._idle = dict.fromkeys(frontier.lanes, 0)  # workers asleep on each lane's event
        self._waking: set[str] = set()  # lanes woken for ready cells, none taken yet
        self._finished = asyncio.Event()
        self._failure: BaseException | None = None
        self.stopped: str | None = None  # why the run ended early
        self._recent: deque[str | None] = deque(maxlen=job.stop.window)  # errors of cells run
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
        if self._finished.is_set():
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

    def stop(self, reason: str) -> None:
        """Ends the run now: requests in flight are dropped, unfinished records not written."""
        if self.stopped is None and not self._frontier.done:
            self.stopped = reason
        self._finished.set()

    async def _worker(self, lane: str) -> None:
        try:
            while not self._finished.is_set() and lane not in self._down:
                async with self._limits[lane].slot():
                    cells = self._frontier.pop_batch(lane, self._batch_limit[lane])
                    self._waking.discard(lane)
                    outcomes = await self._call(lane, cells) if cells else []
                if not cells:
                    await self._sleep(lane)
                    continue
                for cell, outcome in zip(cells, outcomes, strict=True):
                    self._apply(lane, cell, outcome)
                self._settle()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in the runner or a callback: stop the run, loudly
            self._failure = e
            self._finished.set()

    async def _sleep(self, lane: str) -> None:
        self._wake[lane].clear()
        self._idle[lane] += 1
        try:
            await self._wake[lane].wait()
        finally:
            self._idle[lane] -= 1

    def _wake_lane(self, lane: str) -> None:
        if self._idle[lane] and not self._wake[lane].is_set():
            self._waking.add(lane)
        self._wake[lane].set()

    async def _woken_first(self, lane: str) -> None:
        """Lets workers of other lanes that were woken for ready cells (a judge's) take them
        before this worker handles its answer: completions that arrive together then start the
        judge after the first of them, not after all. Bounded: a lane may not be quick to run."""
        for _ in range(4):
            if not self._waking - {lane}:
                return
            await asyncio.sleep(0)

    async def _call(self, lane: str, cells: list[Cell]) -> list[Outcome | EndpointDown]:
        """One request to `lane` for cells of one LLM column: an outcome per cell."""
        column = self._job.column(cells[0].column)
        assert isinstance(column, LLMColumn)
        outcomes: list[Outcome | EndpointDown] = []
        prompts: dict[int, Prompt] = {}  # by position in `cells`
        for i, cell in enumerate(cells):
            try:
                prompts[i] = prompt(column, self._frontier.row(cell))
                outcomes.append(Outcome())
            except RENDER_ERRORS as e:  # a value that does not fit the template
                outcomes.append(Outcome(error=f"cannot render the prompt: {type(e).__name__}: {e}"))
        if not prompts:
            return outcomes
        start = self._stats.now()
        answer = await self._generate[lane](
            column, list(prompts.values()), self._job.graph.priority[column.name]
        )
        await self._woken_first(lane)
        end = self._stats.now()
        for i, result in zip(prompts, answer.results, strict=True):
            down = isinstance(result, EndpointDown)
            outcomes[i] = (
                result if down else llm_outcome(column, result, self._generation(cells[i]))
            )
        spans = [
            RequestSpan(column.name, lane, cells[i].record, start, end, _ok(outcomes[i]))
            for i in prompts
        ]
        self._stats.request(spans, answer.prompt_tokens, answer.completion_tokens)
        return outcomes

    def _generation(self, cell: Cell) -> int:
        return self._frontier.generation(cell)

    def _apply(self, lane: str, cell: Cell, outcome: Outcome | EndpointDown) -> None:
        if isinstance(outcome, EndpointDown):
            self._down.setdefault(lane, str(outcome))
            self._wake_lane(lane)  # the lane's other workers stop too
            self._queue(cell)
            return
        if outcome.usage is not None:
            self._frontier.add_usage(cell, outcome.usage)
        column = self._job.column(cell.column)
        assert isinstance(column, LLMColumn)
        generation = self._generation(cell)
        if outcome.again and generation < column.max_generations:
            self._stats.regenerated(cell.column, counted=False)
            self._queue(cell, regenerate=True)
        elif outcome.again:
            self._resolve(cell, None, f"{outcome.error} (after {generation} generations)")
        else:
            self._resolve(cell, outcome.value, outcome.error)

    def _queue(self, cell: Cell, regenerate: bool = False) -> None:
        """Back to its column's queue: for another endpoint, or another generation."""
        self._frontier.push_again(cell, regenerate)
        for lane in self._frontier.lanes_of(cell.column):
            self._wake_lane(lane)

    def _settle(self) -> None:
        """After cells resolved: runs the Python cells that became ready, fails those no endpoint
        can serve, hands out the records that finished, and ends the run when nothing is left."""
        while self._run_python() | self._fail_unserved():
            pass
        self._drain()
        if self._frontier.done:
            self._finished.set()
        if self._finished.is_set():
            for event in self._wake.values():
                event.set()

    def _resolve(self, cell: Cell, value: Any, error: str | None) -> None:
        """Resolves a cell that ran, and stops the run when too many of the latest failed."""
        for ready in self._frontier.resolve(cell, value, error):
            for lane in self._frontier.lanes_of(ready.column):
                self._wake_lane(lane)
        policy = self._job.stop
        self._recent.append(error)
        if not policy.enabled or len(self._recent) < policy.window:
            return
        failed = [e for e in self._recent if e is not None]
        if len(failed) >= policy.error_rate * policy.window:
            self.stop(
                f"{len(failed)} of the last {policy.window} cells failed (stop.error_rate "
                f"{policy.error_rate}); the last error: {failed[-1]}"
            )

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
        while not self._finished.is_set() and (cell := self._frontier.pop(PYTHON_LANE)):
            column = self._job.column(cell.column)
            assert isinstance(column, PythonColumn)
            value, error = python_value(column, self._frontier.row(cell))
            if column.validates is not None and error is None:
                value, error = self._verdict(cell, column.validates, value)
            if value is not _AGAIN:
                self._resolve(cell, value, error)
            ran = True
        return ran

    def _verdict(self, cell: Cell, target_name: str, verdict: Any) -> tuple[Any, str | None]:
        """A validator's (value, error), or `_AGAIN` when its target goes for another generation."""
        reason = rejection(verdict)
        if reason is None:
            return True, None
        target = Cell(cell.record, target_name)
        column = self._job.column(target_name)
        assert isinstance(column, LLMColumn)
        generation = self._generation(target)
        if generation >= column.max_generations:
            return None, f"rejected {target_name!r}: {reason} (after {generation} generations)"
        counted = self._frontier.regenerate(target, cell)
        self._stats.regenerated(target_name, counted)
        for lane in self._frontier.lanes_of(target_name):
            self._wake_lane(lane)
        return _AGAIN, None

    def _drain(self) -> None:
        resolved, completed = self._frontier.resolved, self._frontier.completed
        for cell, ok in resolved:
            self._stats.cell(cell.column, ok)
        resolved.clear()
        while completed:
            self._on_record(completed.pop(0))


_AGAIN = object()  # a validator's value that sends its target back for another generation


def _ok(outcome: Outcome | EndpointDown) -> bool:
    return isinstance(outcome, Outcome) and outcome.error is None
