"""Typed messages between the front ends (the offline Engine, the HTTP server's processes) and stage
0's scheduler, and their codec (msgspec's MessagePack: typed on both ends, nothing else decodes).

Requests go in once; outputs come back as one columnar `StepOut` per step per front end: the
requests' ids, their new tokens flattened, and per-request columns, so that neither side builds an
object per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec


class ImageIn(msgspec.Struct):
    """One preprocessed image of a request (a vision-language model's input): its patches as raw
    float32 bytes, row-major (t * h * w, channels * temporal_patch * patch * patch), and its grid
    in patches (t, h, w). Its tokens are in the request's `input_ids` already: t * h * w //
    merge_size**2 image-pad tokens per image, the images in order."""

    pixels: bytes
    grid: tuple[int, int, int]
    digest: int  # 63-bit hash of the pixel values: the prefix cache's key for its tokens


class GenerateReq(msgspec.Struct, tag=True):
    rid: str
    input_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields, validated by the front end
    seed: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    priority: int = 0  # lower is admitted first
    owner: int = 0  # the front end that gets its outputs
    images: list[ImageIn] = msgspec.field(default_factory=list)


class GenerateBatch(msgspec.Struct, tag=True):
    """Several requests in one message, so that the scheduler sees them arrive together (an offline
    batch is then prefilled in as few microbatches as the budget allows, not split by arrival)."""

    reqs: list[GenerateReq]


class AbortReq(msgspec.Struct, tag=True):
    rid: str


class ShutdownReq(msgspec.Struct, tag=True):
    pass


TopLogprobs = list[tuple[int, float]]  # one token's alternatives: (token id, logprob)


class StepOut(msgspec.Struct, tag=True):
    """One step's outputs for one front end, as columns. Request i's new tokens are
    `token_ids[sum(num_tokens[:i]) : ... + num_tokens[i]]`; `logprobs` and `top_logprobs` are
    aligned with `token_ids` when any request of the message asked for them, else empty. A
    finished request's row carries its finish reason (and its error, if it never ran)."""

    rids: list[str] = msgspec.field(default_factory=list)
    num_tokens: list[int] = msgspec.field(default_factory=list)
    token_ids: list[int] = msgspec.field(default_factory=list)
    logprobs: list[float] = msgspec.field(default_factory=list)
    top_logprobs: list[TopLogprobs] = msgspec.field(default_factory=list)
    finish_reasons: list[dict[str, Any] | None] = msgspec.field(default_factory=list)
    prompt_tokens: list[int] = msgspec.field(default_factory=list)
    completion_tokens: list[int] = msgspec.field(default_factory=list)
    errors: dict[int, str] = msgspec.field(default_factory=dict)  # row: why it never ran
    queue_times: dict[int, float] = msgspec.field(default_factory=dict)  # row: s at stage 0
    cached_tokens: dict[int, int] = msgspec.field(default_factory=dict)  # row: prompt from cache
    stats: dict[str, Any] = msgspec.field(default_factory=dict)

    def deltas(self) -> Iterator[TokenOut]:
        """Each request's share, in row order."""
        start = 0
        ids, logprobs, top = self.token_ids, self.logprobs, self.top_logprobs
        errors, queue_times, cached = self.errors, self.queue_times, self.cached_tokens
        rows = zip(self.rids, self.num_tokens, self.finish_reasons, self.prompt_tokens, strict=True)
        for i, (rid, n, finish_reason, prompt_tokens) in enumerate(rows):
            end = start + n
            yield TokenOut(
                rid,
                ids[start:end],
                logprobs[start:end] if logprobs else None,
                top[start:end] if top else None,
                finish_reason,
                prompt_tokens,
                self.completion_tokens[i],
                errors.get(i) if errors else None,
                queue_times.get(i) if queue_times else None,
                cached.get(i) if cached else None,
            )
            start = end


@dataclass(slots=True)
class TokenOut:
    """A front end's view of one request's row of a StepOut (built on the front end only)."""

    rid: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    queue_time_s: float | None = None  # on a request's first token: seconds it waited at stage 0
    cached_tokens: int | None = None  # on its first token: prompt tokens the prefix cache gave


@dataclass
class StepOutBuilder:
    """Stage 0's side: rows appended one request at a time, sent as one StepOut."""

    out: StepOut = field(default_factory=StepOut)
    any_logprobs: bool = False  # a row had logprobs: both columns follow token_ids from then on

    def add(
        self,
        rid: str,
        token_ids: list[int],
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: dict[str, Any] | None = None,
        logprob: float | None = None,
        top: TopLogprobs | None = None,
    ) -> int:
        """Appends a row (at most one token: stage 0 sends each step's token as it comes);
        returns its index."""
        o = self.out
        row = len(o.rids)
        o.rids.append(rid)
        o.num_tokens.append(len(token_ids))
        o.token_ids.extend(token_ids)
        o.finish_reasons.append(finish_reason)
        o.prompt_tokens.append(prompt_tokens)
        o.completion_tokens.append(completion_tokens)
        if logprob is not None or top is not None or self.any_logprobs:
            self._add_logprobs(len(token_ids), logprob, top)
        return row

    def _add_logprobs(self, n: int, logprob: float | None, top: TopLogprobs | None) -> None:
        """Keeps both columns aligned with token_ids once any row has them (NaN / [] elsewhere)."""
        o = self.out
        if not self.any_logprobs:  # the first row with logprobs: pad the rows before it
            self.any_logprobs = True
            o.logprobs = [float("nan")] * (len(o.token_ids) - n)
            o.top_logprobs = [[] for _ in range(len(o.token_ids) - n)]
        if n:
            o.logprobs.append(float("nan") if logprob is None else logprob)
            o.top_logprobs.append(top or [])

    def __len__(self) -> int:
        return len(self.out.rids)


ToStage0 = GenerateReq | GenerateBatch | AbortReq | ShutdownReq
_encoder = msgspec.msgpack.Encoder()
_to_stage0 = msgspec.msgpack.Decoder(ToStage0)
_to_frontend = msgspec.msgpack.Decoder(StepOut)


def encode(msg: ToStage0 | StepOut) -> bytes:
    return _encoder.encode(msg)


def decode_request(data: bytes) -> ToStage0:
    """A front end's message; anything else (or malformed) raises msgspec.DecodeError."""
    return _to_stage0.decode(data)


def decode_output(data: bytes) -> StepOut:
    return _to_frontend.decode(data)
