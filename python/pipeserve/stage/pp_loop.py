"""SchedulerPPMixin: the pipeline-parallel event loops, one small loop per role.

Stage 0's TP rank 0 decides every microbatch; its descriptor travels with the proxy tensors, so
later stages only follow. Stage 0's loop passes state: each step launches what it can (at most
`M = pp_size + pp_async_batch_depth` microbatches whose tokens have not come back), *then*
post-processes the oldest microbatch whose tokens are in, *then* waits for the next tokens to
arrive. A request whose tokens have arrived may be launched again at once: its next input is read
from the token pool on the device, so the host's look at the tokens overlaps the next forward.
With every launch slot taken, the microbatch that the next arrival frees is decided *before* that
arrival, so at the arrival stage 0 only launches (scheduling stays off the pipeline's path).

Hosts provide: `cfg`, `ctx` (ParallelContext), `pp`, `tp` (GroupCoordinators), `runner`
(ModelRunner), `liveness` and, on stage 0's TP rank 0, `accept_requests(timeout_s) -> bool` (False
to stop) and `apply_result(rec, tokens)`, plus `scheduler`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeserve.distributed import Channel
from pipeserve.distributed.liveness import wait_live
from pipeserve.model.forward_batch import to_device
from pipeserve.runner.sample_step import SampledTokens
from pipeserve.scheduler.descriptor import (
    NO_SPLIT,
    TOKEN_IDS,
    BatchDescriptor,
    sampled_token_places,
)
from pipeserve.scheduler.req import Req
from pipeserve.stage.descriptor_broadcast import receive_descriptor, send_descriptor
from pipeserve.stage.executor import Executor
from pipeserve.stage.trace import NullTracer, Tracer, merge_traces
from pipeserve.stage.transport import TRANSPORTS, Expected

WAIT_SLICE_S = 1.0  # between liveness checks while a receive is outstanding


@dataclass
class InFlight:
    desc: BatchDescriptor
    reqs: list[Req]
    job: Any = None  # the forward's handle: the tokens (pp = 1) or the proxy's sends
    expected: Expected | None = None  # the tokens' receive (pp > 1)
    tokens: SampledTokens | None = None  # set once they have arrived
    released: bool = False  # its requests may be scheduled again


@dataclass
class LoopState:
    mb_id: int = 0
    running: bool = True
    last_launch: float = field(default_factory=time.monotonic)
    in_pipe: deque[InFlight] = field(default_factory=deque)  # launched, tokens not arrived
    ready: deque[InFlight] = field(default_factory=deque)  # tokens arrived, not post-processed
    prepared: tuple[BatchDescriptor, list[Req]] | None = None  # decided, launched after an arrival


class SchedulerPPMixin:
    def event_loop_pp(self) -> None:
        self.transport = TRANSPORTS[self.cfg.pp_comm_mode](self.pp)
        self.gather_group = self.tp if self.ctx.tp_size > 1 else None
        self.executor = Executor(self.runner.device)
        self.stage_busy: list[float] = []
        self.arrived_since_launch = 0  # token messages stage 0 took in since its last broadcast
        self.rings = ReceiveRings(self.cfg, self.ctx, self.runner)
        self.tracer = NullTracer()
        if self.cfg.pp_trace:
            rank = self.ctx.pp_rank * self.ctx.tp_size + self.ctx.tp_rank
            self.tracer = Tracer(
                self.cfg.pp_trace, rank, self.ctx.pp_rank, self.ctx.tp_rank, self.runner.device
            )
        try:
            if not self.ctx.is_first_stage:
                self._later_stage_loop()
            elif self.ctx.tp_rank == 0:
                self._first_stage_loop()
            else:
                self._first_stage_follower_loop()
        finally:
            self.executor.shutdown()
            self.tracer.write()
        if self.cfg.pp_trace and self.ctx.is_first_stage and self.ctx.tp_rank == 0:
            merge_traces(self.cfg.pp_trace, self.cfg.world_size)

    # ---- stage 0, TP rank 0: decides --------------------------------------------------------------
    def _first_stage_loop(self) -> None:
        s = LoopState()
        while s.running or s.in_pipe or s.ready or s.prepared:
            self._first_stage_step(s)
        rec = self._launch(BatchDescriptor.control("shutdown", s.mb_id), [])
        if self.ctx.pp_size > 1:
            self._receive_tokens(rec)
        self._wait_job(rec)

    def _first_stage_step(self, s: LoopState) -> None:
        busy = s.in_pipe or s.ready or self.scheduler.has_work
        s.running = s.running and self.accept_requests(0.0 if busy else self.cfg.keepalive_s)
        while len(s.in_pipe) < self.cfg.num_microbatches:
            built, s.prepared = s.prepared, None  # decided before its inputs arrived
            if built is None and s.running:
                with self.tracer.span("schedule", s.mb_id):
                    built = self.scheduler.next_microbatch(s.mb_id)
            if built is None:
                break
            self._launch_next(s, *built)
        idle_s = time.monotonic() - s.last_launch
        if s.running and not busy and idle_s >= self.cfg.keepalive_s:
            # NOTE: an idle ring still refreshes every wait (TP broadcasts, header frames)
            self._launch_next(s, BatchDescriptor.control("keepalive", s.mb_id), [])
        if s.ready:  # overlaps the forwards just launched
            self._post_process(s.ready.popleft())
        if s.in_pipe:
            self._prepare(s)
            s.ready.append(self._arrive(s.in_pipe.popleft()))

    def _prepare(self, s: LoopState) -> None:
        """With every launch slot taken, the next launch follows the oldest microbatch's arrival:
        decide it now, while the pipeline computes, counting that microbatch's requests as
        arrived. It is launched only after the arrival, so the device reads their tokens in order.
        An arrival tells the host nothing but that those requests may go again, so the choice is
        the one it would make after it, except that requests which reach stage 0 during the wait
        join the microbatch after this one."""
        if (
            self.ctx.pp_size == 1
            or not s.running
            or s.prepared is not None
            or len(s.in_pipe) < self.cfg.num_microbatches
        ):
            return
        self._release(s.in_pipe[0])
        with self.tracer.span("schedule", s.mb_id):
            s.prepared = self.scheduler.next_microbatch(s.mb_id)

    def _launch_next(self, s: LoopState, desc: BatchDescriptor, reqs: list[Req]) -> None:
        s.in_pipe.append(self._launch(desc, reqs))
        s.mb_id += 1
        s.last_launch = time.monotonic()

    def _launch(self, desc: BatchDescriptor, reqs: list[Req]) -> InFlight:
        if self.ctx.tp_size > 1:
            send_descriptor(self.tp, desc, self.arrived_since_launch)
            self.arrived_since_launch = 0
        now = time.monotonic()
        for req in reqs:
            req.started_at = req.started_at or now
        rec = InFlight(desc, reqs, self.executor.submit(self._forward_and_send, desc))
        if self.ctx.pp_size > 1:  # NOTE: the tokens' receive is claimed before anything else
            rec.expected = self._expect_tokens()
        return rec

    def _forward_and_send(self, desc: BatchDescriptor) -> Any:
        """Stage 0's job: the forward, then (pp > 1) the proxy on to stage 1."""
        out = self.runner.forward(desc, None) if desc.kind == "batch" else {}
        if desc.kind == "batch":
            self.tracer.device_span("forward", desc.mb_id, *self.runner.busy.last)
        if self.ctx.pp_size == 1:
            return out
        with self.tracer.span("send", desc.mb_id):
            return self._send_forward(desc.for_later_stages(), out)

    def _arrive(self, rec: InFlight) -> InFlight:
        """Makes the microbatch's tokens the next inputs of its requests (pp = 1: they are, by
        launch order); from here its requests may be launched again."""
        if self.ctx.pp_size > 1:
            self._receive_tokens(rec)
            self.arrived_since_launch += 1
        self._release(rec)
        return rec

    def _release(self, rec: InFlight) -> None:
        """Once per microbatch: a request already chosen again must stay in the pipe."""
        if not rec.released:
            rec.released = True
            self.scheduler.arrived(rec.reqs)

    def _receive_tokens(self, rec: InFlight) -> None:
        with self.tracer.span("receive-wait", rec.desc.mb_id):
            data = self._complete(rec.expected)
        if data["mb_id"] != rec.desc.mb_id:
            raise RuntimeError(
                f"tokens of microbatch {data['mb_id']} arrived; expected {rec.desc.mb_id}"
            )
        self.stage_busy = list(data["busy"])
        if rec.desc.kind == "batch":
            rec.tokens = self._store_tokens(rec.desc, data)

    def _store_tokens(self, desc: BatchDescriptor, data: dict) -> SampledTokens:
        """Sampled tokens into this rank's token pool, ordered with the forwards that read them,
        and (on CUDA, started here) a host copy for the scheduler."""
        tokens = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        where = sampled_token_places(desc)
        self.executor.submit(self._write_tokens, where, tokens[TOKEN_IDS])
        return SampledTokens.of(tokens)

    def _write_tokens(self, where: np.ndarray, next_token_ids: torch.Tensor) -> None:
        rows, positions = to_device(where, self.runner.device)
        self.runner.tokens.write(rows, positions, next_token_ids)

    def _post_process(self, rec: InFlight) -> None:
        with self.tracer.span("post-process", rec.desc.mb_id):
            if self.ctx.pp_size == 1:
                rec.tokens = rec.job.result()
                self.stage_busy = [self.runner.busy.seconds()]
            self._wait_job(rec)
            if rec.desc.kind == "batch":
                self.apply_result(rec, rec.tokens.wait())

    def _wait_job(self, rec: InFlight) -> None:
        out = rec.job.result()
        if self.ctx.pp_size > 1:
            self._wait_all(out)

    # ---- stage 0, TP ranks > 0: follow rank 0's broadcasts ------------------------------------------
    def _first_stage_follower_loop(self) -> None:
        awaited: deque[tuple[Expected, BatchDescriptor]] = deque()  # launched, tokens not taken
        job = None
        while True:
            desc, arrived = receive_descriptor(self.tp)
            for _ in range(arrived):  # token messages rank 0 took in before deciding this one
                expected, launched = awaited.popleft()
                data = self._complete(expected)
                if launched.kind == "batch":  # a keepalive's reply carries no tokens
                    self._store_tokens(launched, data)
            if job is not None:
                self._wait_job(job)
            job = InFlight(desc, [], self.executor.submit(self._forward_and_send, desc))
            if self.ctx.pp_size > 1 and desc.kind != "shutdown":  # every reply, as rank 0 does
                awaited.append((self._expect_tokens(), desc))
            if desc.kind == "shutdown":
                self._wait_job(job)
                return

    # ---- stages > 0 ----------------------------------------------------------------------------------
    def _later_stage_loop(self) -> None:
        # M proxies claimed ahead: their receives are posted as they arrive, so stage 0's sends
        # complete whatever this stage is computing
        expected = deque(self._expect_proxy() for _ in range(self.cfg.num_microbatches))
        sends: list[Any] = []
        while True:
            data = self._complete(expected.popleft())
            desc = BatchDescriptor.from_dict(data)
            if desc.kind != "shutdown":
                expected.append(self._expect_proxy())
            out = self.runner.forward(desc, data) if desc.kind == "batch" else {}
            if desc.kind == "batch":
                self.tracer.device_span("forward", desc.mb_id, *self.runner.busy.last)
            busy = [*data["busy"], self.runner.busy.seconds()]
            self._wait_all(sends)
            with self.tracer.span("send", desc.mb_id):
                sends = self._send_on(desc, out, busy)
            if desc.kind == "shutdown":
                self._wait_all(sends)
                return

    def _send_on(self, desc: BatchDescriptor, out: Any, busy: list[float]) -> list[Any]:
        if not self.ctx.is_last_stage:
            return self._send_forward(desc, out, busy)
        tokens = out.device if isinstance(out, SampledTokens) else {}
        reply = {"kind": desc.kind, "mb_id": desc.mb_id, "busy": busy, **tokens}
        return self.transport.send(reply, Channel.TOKENS, dst=0)

    def _expect_proxy(self) -> Expected:
        return self.transport.expect(
            Channel.PROXY, self.pp.prev_rank, self.gather_group, NO_SPLIT, self.rings.proxy()
        )

    def _expect_tokens(self) -> Expected:
        src = self.ctx.pp_size - 1
        return self.transport.expect(Channel.TOKENS, src, into=self.rings.tokens())

    def _send_forward(
        self, desc: BatchDescriptor, proxy: dict, busy: list[float] | None = None
    ) -> list[Any]:
        busy = [self.runner.busy.seconds()] if busy is None else busy
        payload = {**desc.to_dict(), "busy": busy, **proxy}
        return self.transport.send(
            payload, Channel.PROXY, self.pp.next_rank, self.gather_group, NO_SPLIT
        )

    def _complete(self, expected: Expected) -> dict:
        """The expected message, waited for as long as every rank is alive."""
        peers = range(self.cfg.world_size)
        return wait_live(
            lambda t: self.transport.complete(expected, t), self.liveness, peers, WAIT_SLICE_S
        )

    def _wait_all(self, works: list[Any]) -> None:
        for w in works:
            w.wait(self.cfg.p2p_timeout_s)


class ReceiveRings:
    """Preallocated receive buffers, taken in turn: proxies on later stages (the largest a
    microbatch can send), sampled tokens on stage 0. A ring holds M + 2 sets: M messages claimed
    ahead, the one being computed, and one whose readers the device may still be running."""

    def __init__(self, cfg: Any, ctx: Any, runner: Any) -> None:
        size = cfg.num_microbatches + 2
        self.turn = {"proxy": 0, "tokens": 0}
        self.sets: dict[str, list[dict]] = {"proxy": [], "tokens": []}
        if ctx.pp_size == 1:
            return
        device, dtype = runner.device, runner.dtype
        if not ctx.is_first_stage:
            shape = (cfg.chunked_prefill_size, runner.model_cfg.hidden_size)
            self.sets["proxy"] = [
                {k: torch.empty(shape, dtype=dtype, device=device) for k in PROXY_KEYS}
                for _ in range(size)
            ]
        elif runner.tokens is not None:
            cap = cfg.micro_batch_cap
            self.sets["tokens"] = [
                {TOKEN_IDS: torch.empty(cap, dtype=torch.int64, device=device)} for _ in range(size)
            ]

    def _next(self, kind: str) -> dict | None:
        ring = self.sets[kind]
        if not ring:
            return None
        self.turn[kind] += 1
        return ring[self.turn[kind] % len(ring)]

    def proxy(self) -> dict | None:
        return self._next("proxy")

    def tokens(self) -> dict | None:
        return self._next("tokens")


PROXY_KEYS = ("hidden_states", "residual")
