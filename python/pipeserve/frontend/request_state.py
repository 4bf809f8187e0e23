"""What a front end (the HTTP server or the offline Engine) gathers of one request from stage 0's
per-step deltas, and SGLang's result shape for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeserve.frontend.detokenizer import TextStream
from pipeserve.ipc.messages import TokenOut
from pipeserve.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What a front end has gathered of one request. Its text comes from `stream` (None without a
    tokenizer: token ids only), which may end the request at a stop string before stage 0 does;
    tokens that arrive after that are dropped."""

    rid: str
    params: SamplingParams
    stream: TextStream | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)
    finish_reason: dict | None = None
    prompt_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens stage 0's prefix cache gave
    ended_here: bool = False  # a stop string ended it while stage 0 still runs it: abort it there

    def apply(self, out: TokenOut) -> None:
        if self.finish_reason is not None:
            return
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        if out.cached_tokens is not None:
            self.cached_tokens = out.cached_tokens
        self.error = out.error
        taken = self._take(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs[:taken])
        if out.top_logprobs:
            self.top_logprobs.extend(out.top_logprobs[:taken])
        stopped = self._stopped()
        self.ended_here = stopped and out.finish_reason is None
        if (
            self.stream is not None
            and self.error is None
            and (stopped or out.finish_reason is not None)
        ):
            self.stream.finish()  # may find a stop string in the text that was not stable yet
        if self._stopped():
            self.finish_reason = {"type": "stop", "matched": self.stream.matched}
        elif out.finish_reason is not None:
            self.finish_reason = out.finish_reason

    def _take(self, token_ids: list[int]) -> int:
        """Appends tokens up to the one that completes a stop string; returns how many."""
        for i, token in enumerate(token_ids):
            self.output_ids.append(token)
            if self.stream is not None and self.stream.push(token):
                return i + 1
        return len(token_ids)

    def _stopped(self) -> bool:
        return self.stream is not None and self.stream.matched is not None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str | None:
        """The text released so far; once finished, the final text. None without a tokenizer."""
        if self.stream is None:
            return None
        return self.stream.text if self.stream.text is not None else self.stream.released_text()


def format_result(s: RequestState) -> dict:
    """SGLang's result shape: text (cut before a stop string; absent without a tokenizer), output
    ids and meta_info."""
    meta: dict[str, Any] = {
        "id": s.rid,
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "completion_tokens": len(s.output_ids),
        "finish_reason": s.finish_reason,
    }
    if s.logprobs:
        meta["output_token_logprobs"] = [
            (lp, t) for lp, t in zip(s.logprobs, s.output_ids, strict=False)
        ]
    if s.top_logprobs:
        meta["output_top_logprobs"] = [[tuple(p) for p in step] for step in s.top_logprobs]
    result = {} if s.text is None else {"text": s.text}
    return {**result, "output_ids": list(s.output_ids), "meta_info": meta}
