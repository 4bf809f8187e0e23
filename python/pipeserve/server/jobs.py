"""Running a parsed Job: one engine request per (prompt, choice), gathered or merged as a stream."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from pipeserve.frontend.request_state import RequestState
from pipeserve.sampling_params import SamplingParams
from pipeserve.server.protocol import ApiError, Job


def expand(job: Job) -> list[tuple[list[int], SamplingParams]]:
    """One (prompt, params) per choice of every prompt (see SamplingParams.choices)."""
    choice_params = dataclasses.replace(job.params, n=job.n).choices()
    return [(ids, p) for ids in job.prompts for p in choice_params]


async def _run_one(
    frontend: Any,
    job: Job,
    rid: str,
    ids: list[int],
    params: SamplingParams,
    sink: asyncio.Queue | None,
    index: int,
) -> RequestState:
    last = None
    wants_logprobs = job.logprobs is not None
    async for state in frontend.generate(
        rid, ids, params, wants_logprobs, job.logprobs or 0, job.priority, job.stream
    ):
        if state.error is not None:
            raise ApiError(state.error, "prompt")
        last = state
        if sink is not None:
            sink.put_nowait((index, state))
    return last


def _start(
    frontend: Any, job: Job, rids: list[str], sink: asyncio.Queue | None
) -> list[asyncio.Task]:
    frontend.metrics.count_prompts(job.prompts)
    return [
        asyncio.create_task(_run_one(frontend, job, rid, ids, p, sink, i))
        for i, (rid, (ids, p)) in enumerate(zip(rids, expand(job), strict=True))
    ]


async def run_all(frontend: Any, job: Job) -> list[RequestState]:
    with frontend.admitted(job.num_requests) as rids:
        tasks = _start(frontend, job, rids, None)
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()  # on error or a client gone, the others abort too


async def run_streaming(frontend: Any, job: Job) -> AsyncIterator[tuple[int, RequestState]]:
    """(choice index, state) after every delta of any choice, in arrival order. The job is
    admitted (or refused) when the first item is asked for."""
    with frontend.admitted(job.num_requests) as rids:
        sink: asyncio.Queue = asyncio.Queue()
        tasks = _start(frontend, job, rids, sink)
        done = asyncio.create_task(asyncio.wait(tasks))
        getter: asyncio.Task | None = None  # pending when the consumer is cancelled: cancel it too
        try:
            while True:
                getter = asyncio.create_task(sink.get())
                finished, _ = await asyncio.wait(
                    {getter, done}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter in finished:
                    yield getter.result()
                    continue
                getter.cancel()
                while not sink.empty():
                    yield sink.get_nowait()
                for t in tasks:
                    if t.exception() is not None:
                        raise t.exception()
                return
        finally:
            for t in [*tasks, done, *([getter] if getter else [])]:
                t.cancel()
