"""A request as stage 0's scheduler sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeserve.sampling_params import SamplingParams


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    priority: int = 0  # lower is admitted first
    owner: int = 0  # the front end that gets its outputs
    arrival: int = 0  # order of arrival at stage 0
    output_ids: list[int] = field(default_factory=list)  # tokens applied on the host
    # KV state: slots owned (one per cached or scheduled position) and the pool row
    req_pool_idx: int | None = None
    slots: list[int] = field(default_factory=list)
    kv_len: int = 0  # positions whose KV is written, or scheduled to be, on every stage
    pending: int = 0  # tokens scheduled to be sampled whose result the host has not applied
    holders: int = 0  # launched microbatches holding it that are not yet post-processed
    in_pipe: bool = False  # in a launched microbatch whose tokens have not reached stage 0
    aborted: bool = False
    finish_reason: dict | None = None
    num_preemptions: int = 0
    # the prefix cache: the first `cached_len` of `slots` are its (locked through `cache_node`);
    # `needs_fill`: its tokens have not entered the token pools since its (re)admission
    cached_len: int = 0
    prompt_cached: int = 0  # of its prompt, the tokens its last admission took from the cache
    cache_node: Any = None
    needs_fill: bool = True
    passed_over: int = 0  # admissions of later requests with longer cached prefixes (LPM)
    float_row: Any = None  # its sampling floats as the descriptor carries them (set at admission)
    # a vision-language request's images (scheduler.images.ReqImage), its prompt's (3, L) rotary
    # positions and the delta of the positions after it; its prefix-cache key (image tokens keyed
    # by their pixels); empty / None / 0 for text
    images: list[Any] = field(default_factory=list)
    mrope: Any = None
    rope_delta: int = 0
    cache_key: list[int] | None = None
    added_at: float = 0.0  # monotonic seconds: arrival at stage 0, then its first launch,
    started_at: float | None = None  # for the queue-time metric only, never for a decision

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def key_ids(self) -> list[int]:
        """Its tokens as the prefix cache keys them."""
        return (self.cache_key or self.prompt_ids) + self.output_ids

    @property
    def future_len(self) -> int:
        """Tokens once every scheduled sample is in: what the token pool will hold."""
        return self.seq_len + self.pending

    @property
    def num_uncached(self) -> int:
        return self.future_len - self.kv_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def done(self) -> bool:
        return self.finished or self.aborted
