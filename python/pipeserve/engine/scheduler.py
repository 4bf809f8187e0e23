"""Stage 0's scheduling policy: admission, chunked prefill mixed with decodes, preemption.

Decisions depend only on the order of calls and their inputs (no clock, RNG or set order), so the
same request stream always yields the same microbatches.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeserve.config import EngineConfig
from pipeserve.engine.batch import REQ_FLOAT_COLUMNS, REQ_INT_COLUMNS, BatchDescriptor
from pipeserve.engine.kv_cache import IndexAllocator
from pipeserve.engine.req import Req


@dataclass
class SampledToken:
    req: Req
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


class Scheduler:
    def __init__(
        self,
        cfg: EngineConfig,
        num_slots: int,
        context_length: int,
        finish_check: Callable[[Req], dict | None],
        vocab_size: int,
    ) -> None:
        self.cfg = cfg
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.slots = IndexAllocator(num_slots, first=1)  # slot 0 is the pad slot
        self.rows = IndexAllocator(cfg.max_running_requests)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.finish_check = finish_check
        self.num_preemptions = 0
        self.num_microbatches = 0  # microbatches built so far
        self.ended: list[Req] = []  # requests the scheduler finished on its own; the host drains it

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, req: Req) -> str | None:
        """Queues `req`; returns why it can never run, if so (nothing is queued then)."""
        if not req.prompt_ids:
            return "the prompt has no tokens"
        bad = next(
            (t for t in req.prompt_ids if type(t) is not int or not 0 <= t < self.vocab_size), None
        )
        if bad is not None:
            return f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})"
        if req.seq_len >= self.context_length:
            return f"prompt has {req.seq_len} tokens; the context length is {self.context_length}"
        if req.seq_len + 1 > self.slots.size:
            return f"prompt has {req.seq_len} tokens; the KV cache holds {self.slots.size}"
        self.waiting.append(req)
        return None

    def abort(self, req: Req) -> bool:
        """Marks `req` aborted; frees it now unless a microbatch holding it is in flight."""
        req.aborted = True
        req.finish_reason = {"type": "abort"}
        if req in self.waiting:
            self.waiting.remove(req)
            return True
        if not req.in_flight and req in self.running:
            self._release(req)
            return True
        return not req.in_flight

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(not r.in_flight for r in self.running)

    # ---- building a microbatch -------------------------------------------------------------------
    def next_microbatch(self, mb_id: int) -> tuple[BatchDescriptor, list[Req]] | None:
        chosen = self._choose()
        if not chosen:
            self._unstick()
            return None
        self.num_microbatches += 1
        return self._describe(mb_id, chosen), [r for r, _ in chosen]

    def _cap(self) -> int:
        """Requests per microbatch: the configured cap, and an even share over the microbatches so
        that every pipeline slot gets work."""
        share = math.ceil((len(self.running) + len(self.waiting)) / self.cfg.num_microbatches)
        return max(1, min(self.cfg.micro_batch_cap, share))

    def _choose(self) -> list[tuple[Req, int]]:
        cap, budget = self._cap(), self.cfg.chunked_prefill_size
        chosen: list[tuple[Req, int]] = []
        promised = 0  # slots the chosen requests will take
        for req in list(self.running):
            if len(chosen) >= cap or budget <= 0:
                return chosen
            if req.in_flight or req.finished or req.req_pool_idx is None:
                continue  # req_pool_idx None: preempted earlier in this loop
            n = min(req.num_uncached, budget)
            if not self._make_room(promised + n, chosen, req):
                break
            chosen.append((req, n))
            budget -= n
            promised += n
        while self.waiting and len(chosen) < cap and budget > 0:
            req = self.waiting[0]
            n = min(req.num_uncached, budget)
            if not self.rows.can_allocate(1) or self.slots.num_free - n < self._reserve(chosen):
                break
            self.waiting.popleft()
            req.req_pool_idx = self.rows.allocate(1)[0]
            self.running.append(req)
            chosen.append((req, n))
            budget -= n
        return chosen

    def _reserve(self, chosen: list[tuple[Req, int]]) -> int:
        """Slots kept back at admission: those already promised this round, plus one decode step for
        every running request, so that admitting never forces an immediate preemption."""
        return sum(n for _, n in chosen) + len(self.running)

    def _make_room(self, n: int, chosen: list[tuple[Req, int]], req: Req) -> bool:
        """Frees slots by preempting the newest requests that are neither in flight nor chosen."""
        while not self.slots.can_allocate(n):
            protected = {id(r) for r, _ in chosen} | {id(req)}
            victims = [r for r in self.running if not r.in_flight and id(r) not in protected]
            if not victims:
                return False
            self.preempt(victims[-1])
        return True

    def preempt(self, req: Req) -> None:
        """Drops `req`'s KV (recomputed later) and puts it at the head of the queue."""
        self._release(req)
        req.kv_len = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _unstick(self) -> None:
        """A lone request whose KV fills the whole pool cannot grow: it ends with reason length."""
        if (
            len(self.running) == 1
            and not self.running[0].in_flight
            and not self.slots.can_allocate(1)
        ):
            req = self.running[0]
            req.finish_reason = {"type": "length", "matched": None}
            self._release(req)
            self.ended.append(req)

    def _describe(self, mb_id: int, chosen: list[tuple[Req, int]]) -> BatchDescriptor:
        req_ints, req_floats, token_ints = [], [], []
        for req, n in chosen:
            new_slots = self.slots.allocate(n)
            token_ints.extend(zip(req.uncached_ids(n), new_slots, strict=True))
            prefix = req.kv_len
            req.slots.extend(new_slots)
            req.kv_len += n
            req.in_flight = True
            p = req.params
            sample = int(req.kv_len == req.seq_len)
            req_ints.append(
                [
                    req.req_pool_idx,
                    prefix,
                    n,
                    sample,
                    req.seed,
                    len(req.output_ids),
                    len(req.prompt_ids),
                    req.top_logprobs_num,
                    int(req.return_logprob),
                    int(not p.ignore_eos and len(req.output_ids) + 1 < p.min_new_tokens),
                ]
            )
            req_floats.append(
                [
                    p.temperature,
                    p.top_p,
                    p.top_k,
                    p.min_p,
                    p.repetition_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                ]
            )
        return BatchDescriptor(
            "batch",
            mb_id,
            torch.tensor(req_ints, dtype=torch.int64).view(-1, len(REQ_INT_COLUMNS)),
            torch.tensor(req_floats, dtype=torch.float32).view(-1, len(REQ_FLOAT_COLUMNS)),
            torch.tensor(token_ints, dtype=torch.int64).view(-1, 2),
        )

    # ---- results -----------------------------------------------------------------------------------
    def process_result(
        self, desc: BatchDescriptor, reqs: list[Req], tokens: dict
    ) -> list[SampledToken]:
        """Applies a returned microbatch: appends sampled tokens, finishes and frees requests."""
        sampled = desc.ints("sample").tolist()
        out, i = [], 0
        for req, s in zip(reqs, sampled, strict=True):
            req.in_flight = False
            if s:
                out.append(self._append(req, tokens, i))
                i += 1
            if req.finished and req in self.running:
                self._release(req)
        return out

    def _append(self, req: Req, tokens: dict, i: int) -> SampledToken:
        token = int(tokens["next_token_ids"][i])
        logprob = (
            float(tokens["logprobs"][i]) if req.return_logprob and "logprobs" in tokens else None
        )
        top = None
        if req.top_logprobs_num and "top_logprob_ids" in tokens:
            k = req.top_logprobs_num
            top = list(
                zip(
                    tokens["top_logprob_ids"][i, :k].tolist(),
                    tokens["top_logprobs"][i, :k].tolist(),
                    strict=True,
                )
            )
        if not req.aborted:
            req.output_ids.append(token)
            req.finish_reason = self.finish_check(req)
        return SampledToken(req, token, logprob, top)

    def _release(self, req: Req) -> None:
        self.slots.free(req.slots)
        req.slots = []
        if req.req_pool_idx is not None:
            self.rows.free([req.req_pool_idx])
            req.req_pool_idx = None
        self.running.remove(req)
