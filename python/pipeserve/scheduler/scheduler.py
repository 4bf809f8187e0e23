"""Stage 0's scheduling policy: admission by (priority, arrival), chunked prefill mixed with
decodes, preemption, and future tokens.

A request may be scheduled again as soon as the tokens of its previous step have reached stage 0's
token pool (`arrived`), before the host has looked at them: its next input is read on the device.
So its end is known one step late; a token sampled past the end is dropped, and its KV is freed
once no launched microbatch holds it. Decisions depend only on the order of calls and their inputs
(no clock, RNG or set order), so the same request stream always yields the same microbatches.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeserve.config import EngineConfig
from pipeserve.scheduler.allocator import IndexAllocator
from pipeserve.scheduler.descriptor import (
    REQ_FLOAT_COLUMNS,
    REQ_INT_COLUMNS,
    BatchDescriptor,
    TokenReply,
    pack_fills,
)
from pipeserve.scheduler.images import describe_images
from pipeserve.scheduler.kv_slots import KVSlots
from pipeserve.scheduler.req import Req
from pipeserve.utils import all_plain_ints


@dataclass(slots=True)
class SampledToken:
    req: Req
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


LPM_WINDOW = 64  # waiting requests compared by cached prefix at each admission
LPM_PATIENCE = 64  # admissions a request may be passed over before it goes first


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
        self.slots = KVSlots(num_slots, not cfg.disable_radix_cache)
        self.rows = IndexAllocator(cfg.max_running_requests)
        self.waiting: list[Req] = []  # sorted by (priority, arrival); preempted ones first
        self.running: list[Req] = []
        self.finish_check = finish_check
        self.num_preemptions = 0
        self.num_microbatches = 0  # microbatches built so far
        self.num_arrived = 0

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, req: Req) -> str | None:
        """Queues `req`; returns why it can never run, if so (nothing is queued then)."""
        if not req.prompt_ids:
            return "the prompt has no tokens"
        ids = req.prompt_ids
        if not (all_plain_ints(ids) and min(ids) >= 0 and max(ids) < self.vocab_size):
            bad = next(t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size)
            return f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})"
        if req.seq_len >= self.context_length:
            return f"prompt has {req.seq_len} tokens; the context length is {self.context_length}"
        # the last sampled token never needs a slot of its own
        try:
            req.float_row = sampling_row(req)
        except (OverflowError, ValueError, TypeError) as e:
            return f"a sampling parameter cannot be used: {e}"
        if not 0 <= req.top_logprobs_num <= self.vocab_size:
            return f"top_logprobs_num {req.top_logprobs_num} is outside [0, {self.vocab_size}]"
        need = min(req.seq_len + req.params.max_new_tokens, self.context_length)
        if need > self.slots.size:  # the front ends refuse it first, by the same rule
            return (
                f"prompt ({req.seq_len} tokens) + max_new_tokens ({req.params.max_new_tokens}) "
                f"needs {need} KV slots; the KV cache holds {self.slots.size}"
            )
        req.arrival, self.num_arrived = self.num_arrived, self.num_arrived + 1
        key = (req.priority, req.arrival)
        if not self.waiting or key >= _queue_key(self.waiting[-1]):  # the usual case: one priority
            self.waiting.append(req)
        else:
            self.waiting.insert(bisect.bisect_right(self.waiting, key, key=_queue_key), req)
        return None

    def abort(self, req: Req) -> bool:
        """Marks `req` aborted; frees it now unless a launched microbatch holds it."""
        req.aborted = True
        req.finish_reason = {"type": "abort"}
        if req in self.waiting:
            self.waiting.remove(req)
            return True
        if req.holders == 0 and req in self.running:
            self._release(req)
        return req.holders == 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(self._step_size(r) >= 0 for r in self.running)

    # ---- building a microbatch -------------------------------------------------------------------
    def next_microbatch(self, mb_id: int) -> tuple[BatchDescriptor, list[Req]] | None:
        chosen = self._choose()
        if not chosen:
            return None
        self.num_microbatches += 1
        return self._describe(mb_id, chosen), [r for r, _ in chosen]

    def arrived(self, reqs: list[Req]) -> None:
        """The tokens of a microbatch holding `reqs` are in stage 0's token pool."""
        for req in reqs:
            req.in_pipe = False

    def _cap(self) -> int:
        """Requests per microbatch: the configured cap, and an even share over the microbatches so
        that every pipeline slot gets work."""
        share = math.ceil((len(self.running) + len(self.waiting)) / self.cfg.num_microbatches)
        return max(1, min(self.cfg.micro_batch_cap, share))

    def _step_size(self, req: Req) -> int:
        """Its uncached tokens (`num_uncached`) if it may step now: not in the pipe, not ended, and
        a step would not pass max_new_tokens or the context; else -1. (The properties spelled
        out: this runs for every running request at every step.)"""
        if req.in_pipe or req.aborted or req.finish_reason is not None or req.req_pool_idx is None:
            return -1
        generated = len(req.output_ids) + req.pending
        future_len = len(req.prompt_ids) + generated
        uncached = future_len - req.kv_len
        if uncached > 1:
            return uncached
        ok = generated < req.params.max_new_tokens and future_len < self.context_length
        return uncached if ok else -1

    def _choose(self) -> list[tuple[Req, int]]:
        cap, budget = self._cap(), self.cfg.chunked_prefill_size
        chosen: list[tuple[Req, int]] = []
        promised = 0  # slots the chosen requests will take
        for req in list(self.running):
            if len(chosen) >= cap or budget <= 0:
                return chosen
            uncached = self._step_size(req)
            if uncached < 0:
                continue  # also a request preempted earlier in this loop
            n = min(uncached, budget)
            if self.slots.available < promised + n and not self._make_room(
                promised + n, chosen, req
            ):
                break
            chosen.append((req, n))
            budget -= n
            promised += n
        while self.waiting and len(chosen) < cap and budget > 0 and self.rows.can_allocate(1):
            i = self._pick_waiting()
            req = self.waiting[i]
            self.slots.match(req)  # its cached prefix: only the rest counts below
            n = min(req.num_uncached, budget)
            # kept back: the slots promised this round, plus one decode step for every running
            # request, so that admitting never forces an immediate preemption
            if self.slots.available - n < promised + len(self.running):
                self.slots.unmatch(req)
                break
            self.slots.admitted(req)
            for skipped in self.waiting[:i]:
                skipped.passed_over += 1
            self.waiting.pop(i)
            req.req_pool_idx = self.rows.allocate(1)[0]
            self.running.append(req)
            chosen.append((req, n))
            budget -= n
            promised += n
        return chosen

    def _pick_waiting(self) -> int:
        """Which waiting request to admit next: among the first LPM_WINDOW of the head's priority,
        the one with the longest cached prefix (SGLang's `lpm`; ties to the earlier arrival), unless
        the head has been passed over LPM_PATIENCE times (then it goes: nothing starves)."""
        head = self.waiting[0]
        if self.slots.cache is None or len(self.waiting) == 1 or head.passed_over >= LPM_PATIENCE:
            return 0
        best, best_len = 0, -1
        for i, req in enumerate(self.waiting[:LPM_WINDOW]):
            if req.priority != head.priority:
                break
            n = self.slots.peek(req)
            if n > best_len:
                best, best_len = i, n
        return best

    def _make_room(self, n: int, chosen: list[tuple[Req, int]], req: Req) -> bool:
        """Frees slots by preempting the newest requests that no microbatch holds or has chosen."""
        while self.slots.available < n:
            protected = {id(r) for r, _ in chosen} | {id(req)}
            victims = [
                r for r in self.running if r.holders == 0 and not r.done and id(r) not in protected
            ]
            if not victims:
                return False
            self.preempt(victims[-1])
        return True

    def preempt(self, req: Req) -> None:
        """Drops `req`'s KV (recomputed later) and puts it at the head of the queue."""
        self._release(req)
        req.kv_len = 0
        req.needs_fill = True
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)

    def _describe(self, mb_id: int, chosen: list[tuple[Req, int]]) -> BatchDescriptor:
        reqs = [r for r, _ in chosen]
        counts = [n for _, n in chosen]
        # every new slot in one allocation, in the order the requests take them (the same slots as
        # one allocation per request)
        out_slots = self.slots.allocate(sum(counts))
        fills = [r for r in reqs if r.needs_fill]  # (re)admitted: its tokens enter the pools
        fill_ids = [r.prompt_ids + r.output_ids for r in fills]
        cached = [r for r in fills if r.cached_len]  # and its cached prefix's slots, every stage
        prefixes = pack_fills(
            np.array([r.req_pool_idx for r in cached], np.int64),
            np.array([r.cached_len for r in cached], np.int64),
            [r.slots[: r.cached_len] for r in cached],
        )
        for r in fills:
            r.needs_fill = False
        prefix = [req.kv_len for req, _ in chosen]
        images = describe_images(chosen, prefix, {id(r) for r in fills})
        steps, samples, taken = [], [], 0
        for req, n in chosen:
            req.slots.extend(out_slots[taken : taken + n])
            taken += n
            req.kv_len += n
            self.slots.commit(req)
            step = len(req.output_ids) + req.pending  # output index of the token sampled now
            steps.append(step)
            sample = req.kv_len == len(req.prompt_ids) + step  # its future_len
            samples.append(sample)
            req.pending += sample
            req.holders += 1
            req.in_pipe = True
        columns = {
            "req_pool_idx": [r.req_pool_idx for r in reqs],
            "prefix_len": prefix,
            "extend_len": counts,
            "sample": samples,
            "seed": [r.seed for r in reqs],
            "step": steps,
            "prompt_len": [len(r.prompt_ids) for r in reqs],
            "top_logprobs_num": [r.top_logprobs_num for r in reqs],
            "return_logprob": [r.return_logprob for r in reqs],
            "ban_eos": [
                not r.params.ignore_eos and step + 1 < r.params.min_new_tokens
                for r, step in zip(reqs, steps, strict=True)
            ],
            "rope_delta": [r.rope_delta for r in reqs],
        }
        req_ints = np.array([columns[name] for name in REQ_INT_COLUMNS], dtype=np.int64)
        return BatchDescriptor(
            "batch",
            mb_id,
            np.ascontiguousarray(req_ints.reshape(len(REQ_INT_COLUMNS), len(chosen)).T),
            np.array([r.float_row for r in reqs], dtype=np.float32).reshape(
                len(chosen), len(REQ_FLOAT_COLUMNS)
            ),
            np.array(out_slots, dtype=np.int64),
            pack_fills(
                np.array([r.req_pool_idx for r in fills], np.int64),
                np.array([len(ids) for ids in fill_ids], np.int64),
                fill_ids,
            ),
            prefixes,
            images.mrope,
            images.visual,
            images.images,
            images.pixels,
        )

    # ---- results -----------------------------------------------------------------------------------
    def process_result(
        self, desc: BatchDescriptor, reqs: list[Req], tokens: TokenReply
    ) -> list[SampledToken]:
        """Applies a returned microbatch: appends its sampled tokens (dropping those past a
        request's end), finishes requests and frees those no launched microbatch holds."""
        sampled = desc.sampled().tolist()
        out, i = [], 0
        for req, s in zip(reqs, sampled, strict=True):
            req.holders -= 1
            if s:
                req.pending -= 1
                if not req.done:
                    out.append(self._append(req, tokens, i))
                i += 1
            if req.done and req.holders == 0 and req in self.running:
                self._release(req)
        return out

    def _append(self, req: Req, tokens: TokenReply, i: int) -> SampledToken:
        token = tokens.next_token_ids[i]
        logprob = tokens.logprobs[i] if req.return_logprob and tokens.logprobs else None
        top = None
        if req.top_logprobs_num and tokens.top_logprob_ids is not None:
            k = req.top_logprobs_num
            top = list(zip(tokens.top_logprob_ids[i][:k], tokens.top_logprobs[i][:k], strict=True))
        req.output_ids.append(token)
        req.finish_reason = self.finish_check(req)
        return SampledToken(req, token, logprob, top)

    def _release(self, req: Req) -> None:
        self.slots.release(req)
        if req.req_pool_idx is not None:
            self.rows.free([req.req_pool_idx])
            req.req_pool_idx = None
        self.running.remove(req)


def _queue_key(req: Req) -> tuple[int, int]:
    return (req.priority, req.arrival)


def sampling_row(req: Req) -> np.ndarray:
    """The request's float columns (batch.REQ_FLOAT_COLUMNS), checked once at admission: a value
    that float32 cannot hold never reaches a descriptor."""
    p = req.params
    row = np.array(
        [
            p.temperature,
            p.top_p,
            p.top_k,
            p.min_p,
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty,
        ],
        dtype=np.float64,
    )
    if not np.isfinite(row).all() or (np.abs(row) > np.finfo(np.float32).max).any():
        raise ValueError(f"values {row.tolist()} do not fit float32")
    return row.astype(np.float32)
