"""The one request core of every front end (the offline Engine and each HTTP server process):
request ids and seeds, building the request message, the KV-fit rule, and routing stage 0's
columnar outputs to the requests' states. No I/O: the callers own their sockets and their waits."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

from pipeserve.capacity import kv_slots_needed
from pipeserve.frontend.detokenizer import Detokenizer
from pipeserve.frontend.request_state import RequestState
from pipeserve.ipc.messages import GenerateReq, ImageIn, StepOut, TokenOut
from pipeserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    """What the ranks reported at start-up that front ends check requests against."""

    context_length: int
    num_slots: int

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EngineLimits:
        return cls(int(info["context_length"]), int(info["num_slots"]))

    def kv_fit_error(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """Why the KV pool cannot hold the request whole (it would end short), or None."""
        need = kv_slots_needed(prompt_len, max_new_tokens, self.context_length)
        if need <= self.num_slots:
            return None
        return (
            f"{prompt_len} prompt tokens + max_new_tokens {max_new_tokens} exceed the KV cache "
            f"pool of {self.num_slots} tokens"
        )


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options besides the sampling parameters."""

    return_logprob: bool = False
    top_logprobs_num: int = 0
    priority: int = 0  # lower is admitted first
    streamed: bool = False  # its text is read while it runs (else decoded once at the end)


class RequestClient:
    """Builds requests and applies outputs. `owner`: this front end's index (stage 0 sends it the
    outputs of its requests only)."""

    def __init__(self, detokenizer: Detokenizer | None, owner: int = 0) -> None:
        self.detokenizer = detokenizer
        self.owner = owner
        self.outstanding: dict[str, RequestState] = {}

    @staticmethod
    def new_rid() -> str:
        return uuid.uuid4().hex

    def new_request(
        self,
        ids: list[int],
        params: SamplingParams,
        opts: RequestOptions,
        rid: str | None = None,
        images: list[ImageIn] | None = None,
    ) -> tuple[GenerateReq, RequestState]:
        """The message for stage 0 and the state that gathers its outputs (now outstanding).
        `images`: a vision-language prompt's preprocessed images, their tokens in `ids`."""
        rid = rid or self.new_rid()
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        msg = GenerateReq(
            rid,
            ids,
            params.to_dict(),
            seed,
            opts.return_logprob,
            opts.top_logprobs_num,
            opts.priority,
            self.owner,
            images or [],
        )
        text = None if self.detokenizer is None else self.detokenizer.stream(params, opts.streamed)
        state = RequestState(rid, params, text, prompt_tokens=len(ids))
        self.outstanding[rid] = state
        return msg, state

    def apply(self, msg: StepOut) -> tuple[list[tuple[RequestState, TokenOut]], list[str]]:
        """Applies every row to its outstanding request: the (state, row) pairs applied, and the
        ids that a stop string ended here while stage 0 still runs them (abort them there).
        Finished requests stop being outstanding; rows of unknown ids are dropped."""
        applied, ended_here = [], []
        for out in msg.deltas():
            state = self.outstanding.get(out.rid)
            if state is None:
                continue
            state.apply(out)
            applied.append((state, out))
            if state.finished:
                del self.outstanding[out.rid]
            if state.ended_here:
                ended_here.append(out.rid)
        return applied, ended_here

    def forget(self, rid: str) -> RequestState | None:
        return self.outstanding.pop(rid, None)
