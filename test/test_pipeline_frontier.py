"""The pipeline runner's frontier and dispatch logic, in-process: ready-set updates, per-endpoint
limits, priority order, failure propagation and resume plans. The endpoint here is an async
function that answers after a short sleep; test_pipeline_e2e.py runs the same code over HTTP."""

from __future__ import annotations

import asyncio

import pytest

from pipeserve.pipeline import Endpoint, Job, LLMColumn, PythonColumn
from pipeserve.pipeline.dispatch import Dispatcher
from pipeserve.pipeline.endpoint.client import Answer, CellError, Generation
from pipeserve.pipeline.frontier import PYTHON_LANE, Cell, Frontier
from pipeserve.pipeline.io import plan_records
from pipeserve.pipeline.stats import RunStats


def arith_job(gen: str = "a", judge: str = "b", limit: int = 2, batch: int = 1) -> Job:
    endpoints = {
        n: Endpoint(n, f"http://127.0.0.1:1/{n}", max_concurrency=limit, max_batch_size=batch)
        for n in "ab"
    }
    return Job(
        tuple(endpoints.values()),
        (
            LLMColumn("sum", gen, "{x}+{y}="),
            LLMColumn("check", judge, "{sum}-{y}="),
            PythonColumn("ok", lambda row: int(row["check"]) == row["x"], ("check",)),
        ),
    )


def records(n: int) -> list[dict]:
    return [{"x": i, "y": 10 * i} for i in range(n)]


def frontier(job: Job, n: int) -> Frontier:
    return Frontier(job, plan_records(job, records(n), {}))


def drain(f: Frontier, lane: str) -> list[Cell]:
    out = []
    while (cell := f.pop(lane)) is not None:
        out.append(cell)
    return out


def test_graph_order_depth_and_priority():
    job = arith_job()
    g = job.graph
    assert g.order == ("sum", "check", "ok")
    assert (g.depth["sum"], g.depth["check"], g.depth["ok"]) == (0, 1, 2)
    assert g.priority == {"sum": 1, "check": 0}  # lower is served earlier: the judge first
    assert g.field_refs["sum"] == ("x", "y") and g.field_refs["check"] == ("y",)
    assert g.downstream({"sum"}) == {"sum", "check", "ok"}
    explicit = Job(job.endpoints, (LLMColumn("sum", "a", "{x}", priority=7),))
    assert explicit.graph.priority == {"sum": 7}


def test_initial_frontier_holds_root_cells_in_record_order():
    f = frontier(arith_job(), 3)
    assert f.ready("a") == 3 and f.ready("b") == 0 and f.ready(PYTHON_LANE) == 0
    assert drain(f, "a") == [Cell(0, "sum"), Cell(1, "sum"), Cell(2, "sum")]


def test_completion_makes_dependents_ready_at_once():
    f = frontier(arith_job(), 3)
    first = f.pop("a")
    assert first == Cell(0, "sum")
    assert f.resolve(first, "0") == [Cell(0, "check")]
    assert f.ready("b") == 1
    assert f.row(Cell(0, "check")) == {"x": 0, "y": 0, "sum": "0"}
    check = f.pop("b")
    assert f.resolve(check, "0") == [Cell(0, "ok")]
    assert f.pop(PYTHON_LANE) == Cell(0, "ok")
    f.resolve(Cell(0, "ok"), True)
    assert f.completed == [0] and not f.done
    assert f.result(0) == ({"x": 0, "y": 0, "sum": "0", "check": "0", "ok": True}, {})


def test_deeper_cells_and_earlier_records_come_first_on_a_shared_endpoint():
    f = frontier(arith_job(gen="a", judge="a"), 4)
    for cell in (f.pop("a"), f.pop("a"), f.pop("a")):  # sum of records 0, 1, 2 in flight
        assert cell.column == "sum"
    f.resolve(Cell(2, "sum"), "20")
    f.resolve(Cell(1, "sum"), "10")
    # Both judges (depth 1, record order) go before the last generator cell.
    assert drain(f, "a") == [Cell(1, "check"), Cell(2, "check"), Cell(3, "sum")]


def test_failure_skips_dependents_with_an_error_naming_the_input():
    f = frontier(arith_job(), 2)
    f.pop("a")
    assert f.resolve(Cell(0, "sum"), error="HTTP 500: boom") == []
    _, errors = f.result(0)
    assert errors == {
        "sum": "HTTP 500: boom",
        "check": "not run: input column 'sum' failed",
        "ok": "not run: input column 'check' failed",
    }
    assert f.completed == [0]
    assert [(c, ok) for c, ok in f.resolved] == [
        (Cell(0, "sum"), False),
        (Cell(0, "check"), False),
        (Cell(0, "ok"), False),
    ]


def test_resume_plan_keeps_finished_cells_and_reruns_failed_ones_downstream():
    job = arith_job()
    recs = [{"id": "r0", "x": 1, "y": 2}, {"id": "r1", "x": 3, "y": 4}, {"x": 5, "y": 6}]
    finished = {
        ("id", "r0"): {**recs[0], "sum": "3", "check": "1", "ok": True, "_index": 0},
        ("id", "r1"): {
            **recs[1],
            "sum": "7",
            "check": None,
            "ok": None,
            "_index": 1,
            "_errors": {"check": "HTTP 503", "ok": "not run"},
        },
    }
    plans = plan_records(job, recs, finished)
    assert [p.position for p in plans] == [1, 2]  # r0 is done
    assert plans[0].run == {"check", "ok"} and plans[0].values["sum"] == "7"
    assert plans[1].run == {"sum", "check", "ok"}
    f = Frontier(job, plans)
    assert drain(f, "b") == [Cell(1, "check")] and drain(f, "a") == [Cell(2, "sum")]


class FakeEndpoint:
    """Answers `x+y=` and `s-y=` after `delay_s`, recording the order of calls and the most
    requests it had in flight at once."""

    def __init__(
        self, delay_s: float = 0.01, fail: frozenset[str] = frozenset(), log: list | None = None
    ) -> None:
        self.delay_s, self.fail = delay_s, fail
        self.log = [] if log is None else log  # ("start" | "end", column), maybe shared
        self.calls: list[tuple[str, str, int]] = []  # one per prompt
        self.requests: list[int] = []  # prompts per request
        self.in_flight = self.most_in_flight = 0

    async def __call__(self, column: LLMColumn, prompts: list[str], priority: int) -> Answer:
        self.calls.extend((column.name, p, priority) for p in prompts)
        self.requests.append(len(prompts))
        self.log.append(("start", column.name))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(self.delay_s)
        self.in_flight -= 1
        self.log.extend(("end", column.name) for _ in prompts)
        return Answer([self.answer(p) for p in prompts])

    def answer(self, prompt: str) -> Generation | CellError:
        if prompt in self.fail:
            return CellError("HTTP 500: injected")
        left, op, right = prompt.rstrip("=").partition("+" if "+" in prompt else "-")
        text = str(int(left) + int(right) if op == "+" else int(left) - int(right))
        return Generation(text, "stop", 3, 1)


def dispatch(job: Job, n: int, endpoints: dict[str, FakeEndpoint]) -> dict[int, tuple]:
    plans = plan_records(job, records(n), {})
    f = Frontier(job, plans)
    stats = RunStats({c.name: n for c in job.columns}, {c.name: 0 for c in job.columns}, False)
    written: dict[int, tuple] = {}
    asyncio.run(
        Dispatcher(job, f, endpoints, stats, lambda r: written.update({r: f.result(r)})).run()
    )
    return written


def test_dispatch_respects_per_endpoint_limits_and_finishes_every_record():
    a, b = FakeEndpoint(), FakeEndpoint()
    job = arith_job(limit=3)
    out = dispatch(job, 20, {"a": a, "b": b})
    assert sorted(out) == list(range(20))
    assert all(values["ok"] is True and not errors for values, errors in out.values())
    assert a.most_in_flight == 3 and b.most_in_flight == 3
    assert {p for c, _, p in a.calls} == {1} and {p for c, _, p in b.calls} == {0}


def test_judge_starts_as_soon_as_the_first_generator_cell_is_done():
    log: list[tuple[str, str]] = []
    out = dispatch(arith_job(limit=2), 40, {"a": FakeEndpoint(log=log), "b": FakeEndpoint(log=log)})
    assert len(out) == 40
    first_judge = log.index(("start", "check"))
    # Only the first wave of generator requests (the limit, 2) had finished by then, of 40.
    assert log[:first_judge].count(("end", "sum")) <= 2


def test_shared_endpoint_with_one_slot_runs_records_one_after_another():
    ep = FakeEndpoint(delay_s=0.001)
    dispatch(arith_job(gen="a", judge="a", limit=1), 4, {"a": ep, "b": FakeEndpoint()})
    names = [f"{c}{p}" for c, p, _ in ep.calls]
    assert names == ["sum0+0=", "check0-0=", "sum1+10=", "check11-10=", "sum2+20=",
                     "check22-20=", "sum3+30=", "check33-30="]  # fmt: skip


def test_a_failed_cell_is_recorded_and_the_rest_still_runs():
    out = dispatch(
        arith_job(), 5, {"a": FakeEndpoint(fail=frozenset({"2+20="})), "b": FakeEndpoint()}
    )
    assert sorted(out) == list(range(5))
    assert out[2][1]["sum"] == "HTTP 500: injected"
    assert set(out[2][1]) == {"sum", "check", "ok"}
    assert all(not out[i][1] for i in (0, 1, 3, 4))


def test_python_column_error_is_a_cell_error():
    job = Job(
        (Endpoint("a", "http://127.0.0.1:1"),),
        (
            LLMColumn("sum", "a", "{x}+{y}="),
            PythonColumn("bad", lambda row: 1 // 0, ("sum",)),
            PythonColumn("unjsonable", lambda row: {1, 2}, ("sum",)),
        ),
    )
    out = dispatch(job, 2, {"a": FakeEndpoint()})
    errors = out[0][1]
    assert errors["bad"] == "ZeroDivisionError: integer division or modulo by zero"
    assert errors["unjsonable"].startswith("TypeError")


@pytest.mark.parametrize("n", [0, 3])
def test_a_job_of_only_python_columns_runs_without_workers(n):
    job = Job((), (PythonColumn("double", lambda row: 2 * row["x"]),))
    out = dispatch(job, n, {})
    assert {r: v[0]["double"] for r, v in out.items()} == {i: 2 * i for i in range(n)}


def test_pop_batch_takes_ready_cells_of_one_column_in_lane_order():
    f = frontier(arith_job(gen="a", judge="a"), 6)
    assert f.pop_batch("a", {"sum": 2, "check": 4}) == [Cell(0, "sum"), Cell(1, "sum")]
    for record in (1, 0):
        f.resolve(Cell(record, "sum"), str(11 * record))
    # Both ready judges come first; the batch stops where the column changes.
    assert f.pop_batch("a", {"sum": 2, "check": 4}) == [Cell(0, "check"), Cell(1, "check")]
    assert f.pop_batch("a", {"sum": 3, "check": 4}) == [
        Cell(2, "sum"),
        Cell(3, "sum"),
        Cell(4, "sum"),
    ]
    assert f.pop_batch("b", {"sum": 3, "check": 4}) == []


def test_batched_dispatch_sends_several_prompts_per_request_within_the_limits():
    a, b = FakeEndpoint(), FakeEndpoint()
    out = dispatch(arith_job(limit=2, batch=4), 30, {"a": a, "b": b})
    assert sorted(out) == list(range(30))
    assert all(values["ok"] is True and not errors for values, errors in out.values())
    assert max(a.requests) == 4 and a.requests[:2] == [4, 4] and sum(a.requests) == 30
    assert max(b.requests) <= 4 and sum(b.requests) == 30
    assert a.most_in_flight == 2 and b.most_in_flight == 2


def test_a_prompt_that_cannot_be_rendered_fails_its_cell_only():
    job = Job(
        (Endpoint("a", "http://127.0.0.1:1", max_batch_size=4),),
        (LLMColumn("sum", "a", "{x:d}+{y}="),),
    )
    ep = FakeEndpoint()
    f = Frontier(job, plan_records(job, [{"x": 1, "y": 2}, {"x": "one", "y": 2}], {}))
    stats = RunStats({"sum": 2}, {"sum": 0}, False)
    written: dict[int, tuple] = {}
    asyncio.run(
        Dispatcher(job, f, {"a": ep}, stats, lambda r: written.update({r: f.result(r)})).run()
    )
    assert written[0] == ({"x": 1, "y": 2, "sum": "3"}, {})
    assert written[1][1]["sum"].startswith("cannot render the prompt: ValueError")
    assert [p for _, p, _ in ep.calls] == ["1+2="]


def two_judges_job(batch: int) -> Job:
    """A generator on `a`, two judges of the same depth sharing endpoint `b`."""
    endpoints = tuple(
        Endpoint(n, f"http://127.0.0.1:1/{n}", max_concurrency=2, max_batch_size=batch)
        for n in "ab"
    )
    return Job(
        endpoints,
        (
            LLMColumn("sum", "a", "{x}+{y}="),
            LLMColumn("check", "b", "{sum}-{y}="),
            LLMColumn("recheck", "b", "{sum}-{x}="),
        ),
    )


def test_judges_of_one_depth_on_one_endpoint_are_batched_per_column():
    f = frontier(two_judges_job(batch=8), 4)
    for cell in drain(f, "a"):
        f.resolve(cell, str(11 * cell.record))
    limit = {"sum": 8, "check": 8, "recheck": 8}
    assert f.pop_batch("b", limit) == [Cell(r, "check") for r in range(4)]
    assert f.pop_batch("b", limit) == [Cell(r, "recheck") for r in range(4)]


def test_two_judges_sharing_an_endpoint_fill_their_batches():
    a, b = FakeEndpoint(delay_s=0.001), FakeEndpoint(delay_s=0.001)
    out = dispatch(two_judges_job(batch=8), 400, {"a": a, "b": b})
    assert len(out) == 400 and all(not errors for _, errors in out.values())
    assert sum(b.requests) == 800
    assert len(b.requests) <= 110, b.requests[:20]  # 100 full batches, a few partial ones
