"""SGLang's native /generate: `text` or `input_ids`, `sampling_params`, `stream`, logprobs."""

from __future__ import annotations

from typing import Any

from pipeserve.frontend.request_state import RequestState, format_result
from pipeserve.server.jobs import checked, run_all
from pipeserve.server.openai_api import ModelInfo, check_text_free, encode, prompt_texts
from pipeserve.server.protocol import (
    ApiError,
    Job,
    check_stop_ids,
    checked_params,
    get,
    logprobs_count,
    priority,
    token_lists,
)
from pipeserve.server.push import DONE, Throttle, sse_event


def parse_generate(body: dict, m: ModelInfo) -> tuple[Job, bool]:
    """Returns the job and whether the caller sent a batch (then the answer is a list). The bounds
    are those of the OpenAI routes (n, stop strings, prompts per request, context and KV pool)."""
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise ApiError("give exactly one of 'text' and 'input_ids'", "text")
    if text is not None:
        batch = isinstance(text, list)
        texts = prompt_texts(text, "text")
        if texts is None:
            raise ApiError("'text' must be a non-empty string or a list of them", "text")
        prompts = [encode(m, t, "text") for t in texts]
    else:
        if not isinstance(ids, list):
            raise ApiError(
                "'input_ids' must be a list of token ids or a list of such lists", "input_ids"
            )
        batch = bool(ids) and isinstance(ids[0], list)
        prompts = token_lists(ids, "input_ids", m.vocab_size)
    prompt_param = "text" if text is not None else "input_ids"
    # SGLang's image_data: each image needs its placeholder in the prompt, in order (for Qwen-VL
    # the chat template's <|vision_start|><|image_pad|><|vision_end|>)
    prompts, images = m.image_processor.prepare_prompts(
        prompts, body.get("image_data"), batch, prompt_param
    )
    params = checked_params(get(body, "sampling_params", dict, {}), {}, "sampling_params.")
    if params.max_new_tokens < 1:
        raise ApiError(
            "sampling_params.max_new_tokens must be >= 1", "sampling_params.max_new_tokens"
        )
    check_stop_ids(params, m.vocab_size, "sampling_params.stop_token_ids")
    for p in prompts:
        too_long = len(p) >= m.capacity.max_sequence
        param = prompt_param if too_long else "sampling_params.max_new_tokens"
        m.capacity.check(len(p), params.max_new_tokens, param)
    top = logprobs_count(body, "top_logprobs_num", 0)
    logprobs = top if get(body, "return_logprob", bool, False) else None
    stream = get(body, "stream", bool, False)
    job = Job(prompts, params, params.n, stream, logprobs, priority=priority(body), images=images)
    return job, batch


async def generate(frontend: Any, job: Job, m: ModelInfo, batch: bool) -> Any:
    check_text_free(job, m)
    answers = [format_result(s) for s in await run_all(frontend, job)]
    return answers if batch or job.n > 1 else answers[0]


class GenerateEvents:
    """/generate's events, like SGLang's: each carries the text so far (what the request's
    TextStream has released; the last event's is the final text), with an `index` for batches.
    Built step by step, from the output reader (server.push)."""

    def __init__(self, job: Job, m: ModelInfo, states: list[RequestState], interval: int) -> None:
        check_text_free(job, m)
        self.states, self.throttle = states, Throttle(job.num_requests, interval)

    def step(self, changed: list[int]) -> list[bytes]:
        out = []
        for i in changed:
            s = checked(self.states[i])
            if self.throttle.take(i, s) is not None:
                out.append(sse_event({**format_result(s), "index": i}))
        return out

    def end(self) -> list[bytes]:
        return [DONE]
