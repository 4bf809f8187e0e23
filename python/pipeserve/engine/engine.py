"""The offline API: `Engine(model_path=..., pp_size=..., ...).generate(prompts, sampling_params)`.

The Engine is a front end like the HTTP server: it tokenizes, hands requests to stage 0 over IPC,
and assembles the per-step deltas that come back. The ranks run in their own processes.
"""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from pipeserve.config import EngineConfig, resolve_config
from pipeserve.engine.ipc import (
    AbortReq,
    FrontendSockets,
    GenerateBatch,
    GenerateReq,
    IpcAddresses,
    ShutdownReq,
    TokenOut,
)
from pipeserve.engine.processes import RankFailure, RankGroup
from pipeserve.engine.sampling_params import SamplingParams
from pipeserve.engine.tokenizer import load_tokenizer, trim_at_stop

logger = logging.getLogger("pipeserve.engine")

Prompt = str | list[int]


@dataclass
class RequestState:
    """What a front end has gathered of one request."""

    rid: str
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)
    finish_reason: dict | None = None
    prompt_tokens: int = 0
    error: str | None = None

    def apply(self, out: TokenOut) -> None:
        self.output_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or [])
        self.top_logprobs.extend(out.top_logprobs or [])
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.finish_reason = out.finish_reason
        self.error = out.error

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def format_result(tokenizer: Any, s: RequestState) -> dict:
    """SGLang's result shape: text (cut before a stop string), output ids and meta_info."""
    text = tokenizer.decode(s.output_ids, skip_special_tokens=s.params.skip_special_tokens)
    if s.finished and s.params.stop and not s.params.no_stop_trim:
        text = trim_at_stop(text, s.params.stop)
    meta: dict[str, Any] = {
        "id": s.rid,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": len(s.output_ids),
        "finish_reason": s.finish_reason,
    }
    if s.logprobs:
        meta["output_token_logprobs"] = [
            (lp, t) for lp, t in zip(s.logprobs, s.output_ids, strict=False)
        ]
    if s.top_logprobs:
        meta["output_top_logprobs"] = [[tuple(p) for p in step] for step in s.top_logprobs]
    return {"text": text, "output_ids": list(s.output_ids), "meta_info": meta}


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.config: EngineConfig = resolve_config(model_path=model_path, **kwargs)
        self.tokenizer = load_tokenizer(self.config.tokenizer_path or self.config.model_path)
        self.ipc = IpcAddresses.fresh()
        self.sockets = FrontendSockets(self.ipc)
        self.ranks = RankGroup(self.config, self.ipc)
        self.closed = False
        self.outstanding: dict[str, RequestState] = {}
        try:
            self.info = self.ranks.wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.stats: dict[str, Any] = {}

    # ---- generation ----------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt | list[Prompt] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> dict | list[dict]:
        """One dict per prompt: text, output_ids and meta_info (token counts, finish reason, and
        logprobs when asked). A single prompt gives a single dict."""
        prompts, single = self._normalize(prompt if input_ids is None else input_ids)
        raw = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        if len(raw) != len(prompts):
            raise ValueError(f"{len(raw)} sampling_params for {len(prompts)} prompts")
        params = [SamplingParams.from_dict(p) for p in raw]  # all validated before any is submitted
        if any(not ids for ids in prompts):
            raise ValueError("a prompt must have at least one token")
        states = self.submit_many(
            [(p, sp) for p, sp in zip(prompts, params, strict=True)],
            return_logprob,
            top_logprobs_num,
        )
        self.wait(states)
        results = [self.result(s) for s in states]
        return results[0] if single else results

    def _normalize(self, prompt: Any) -> tuple[list[list[int]], bool]:
        if prompt is None:
            raise ValueError("generate() needs a prompt or input_ids")
        single = isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
        )
        items = [prompt] if single else list(prompt)
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in items], single

    def submit(
        self,
        ids: list[int],
        params: SamplingParams,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> RequestState:
        return self.submit_many([(ids, params)], return_logprob, top_logprobs_num)[0]

    def submit_many(
        self,
        items: list[tuple[list[int], SamplingParams]],
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> list[RequestState]:
        """Queues (prompt ids, params) pairs in one message, so that they are scheduled together."""
        if not items:
            return []
        reqs, states = [], []
        for ids, params in items:
            rid = uuid.uuid4().hex
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            reqs.append(
                GenerateReq(rid, ids, params.to_dict(), seed, return_logprob, top_logprobs_num)
            )
            states.append(RequestState(rid, params, prompt_tokens=len(ids)))
        self.sockets.send(reqs[0] if len(reqs) == 1 else GenerateBatch(reqs))
        for state in states:
            self.outstanding[state.rid] = state
        return states

    def wait(self, states: list[RequestState]) -> None:
        """Blocks until every one of `states` has finished; raises RankFailure if a rank dies.
        Outputs of other outstanding requests that arrive meanwhile are kept for their own wait."""
        try:
            while not all(s.finished for s in states):
                self.poll(0.5)
        except RankFailure:
            self.shutdown()
            raise
        except BaseException:
            for s in states:
                if not s.finished:
                    self.abort(s)
                    self.outstanding.pop(s.rid, None)
            raise

    def poll(self, timeout_s: float) -> None:
        """Applies the next batch of outputs, waiting up to `timeout_s`; checks the ranks if none."""
        msg = self.sockets.recv(timeout_s)
        if msg is None:
            self.ranks.check_alive()
            return
        self.stats = msg.stats
        for out in msg.outputs:
            if (state := self.outstanding.get(out.rid)) is not None:
                state.apply(out)
                if state.finished:
                    del self.outstanding[out.rid]

    def abort(self, state: RequestState) -> None:
        """Asks stage 0 to drop the request; `wait` then sees it finish with reason abort."""
        self.sockets.send(AbortReq(state.rid))

    def result(self, s: RequestState) -> dict:
        if s.error is not None:
            raise ValueError(s.error)
        return format_result(self.tokenizer, s)

    # ---- lifecycle -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with contextlib.suppress(zmq.ZMQError):  # stage 0 may be gone already
                self.sockets.send(ShutdownReq())
        finally:
            self.ranks.stop()
            self.sockets.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            with contextlib.suppress(Exception):
                self.shutdown()
