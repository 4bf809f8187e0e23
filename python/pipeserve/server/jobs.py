"""Running a parsed Job: one engine request per (prompt, choice), gathered or merged as a stream."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeserve.frontend.client import RequestOptions
from pipeserve.frontend.request_state import RequestState
from pipeserve.ipc.messages import ImageIn
from pipeserve.sampling_params import SamplingParams
from pipeserve.server.protocol import ApiError, Job


def expand(job: Job) -> list[tuple[list[int], SamplingParams, list[ImageIn]]]:
    """One (prompt, params, images) per choice of every prompt (see SamplingParams.choices)."""
    params = job.params if job.params.n == job.n else dataclasses.replace(job.params, n=job.n)
    choice_params = params.choices()
    return [(ids, p, job.images_of(i)) for i, ids in enumerate(job.prompts) for p in choice_params]


def _options(job: Job) -> RequestOptions:
    return RequestOptions(job.logprobs is not None, job.logprobs or 0, job.priority, job.stream)


def checked(state: RequestState) -> RequestState:
    """`state`, or an ApiError if its request failed."""
    if state.error is not None:
        raise ApiError(state.error, "prompt")
    return state


async def submitted(frontend: Any, job: Job, run: Any) -> None:
    """Counts the job's prompts and sends its requests (one per choice) to stage 0."""
    frontend.metrics.count_prompts(job.prompts)  # once each, however many choices (n)
    await frontend.submit(run, expand(job), _options(job))


async def run_all(frontend: Any, job: Job) -> list[RequestState]:
    """Every choice's final state; the first error raises (and aborts the others)."""
    with frontend.admitted(job.num_requests, each_step=False) as run:
        await submitted(frontend, job, run)
        while not run.finished:
            for i in await run.next_changes():
                checked(run.states[i])
        return run.states
