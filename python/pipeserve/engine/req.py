"""A request as stage 0's scheduler sees it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeserve.engine.sampling_params import SamplingParams


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    return_logprob: bool = False
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    # KV state: slots owned (one per cached or scheduled position) and the pool row
    req_pool_idx: int | None = None
    slots: list[int] = field(default_factory=list)
    kv_len: int = 0  # positions whose KV is written, or scheduled to be, on every stage
    in_flight: bool = False
    aborted: bool = False
    finish_reason: dict | None = None
    num_preemptions: int = 0

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncached(self) -> int:
        return self.seq_len - self.kv_len

    def uncached_ids(self, n: int) -> list[int]:
        """Token ids of positions [kv_len, kv_len + n)."""
        start, end, p = self.kv_len, self.kv_len + n, len(self.prompt_ids)
        return self.prompt_ids[start:end] + self.output_ids[max(start - p, 0) : max(end - p, 0)]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
