"""SchedulerPPMixin: the pipeline-parallel event loops, one small loop per role.

Stage 0's TP rank 0 decides every microbatch; its descriptor travels with the proxy tensors, so
later stages only follow. `M = pp_size + pp_async_batch_depth` microbatches are in flight at most,
and a request sits in at most one of them. Every receive a loop will need is posted before it
launches compute; handles are waited on only where their data is used.

Hosts provide: `cfg`, `ctx` (ParallelContext), `pp`, `tp` (GroupCoordinators), `runner`
(ModelRunner) and, on stage 0's TP rank 0, `accept_requests(timeout_s) -> bool` (False to stop)
and `apply_result(rec, tokens)`, plus `scheduler`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipeserve.distributed import Channel
from pipeserve.engine.batch import NO_SPLIT, BatchDescriptor
from pipeserve.engine.pp_transport import TRANSPORTS, Expected
from pipeserve.engine.req import Req


@dataclass
class InFlight:
    desc: BatchDescriptor
    reqs: list[Req]
    sends: list[Any] = field(default_factory=list)
    expected: Expected | None = None
    result: dict | None = None  # set at launch when this rank is also the last stage


class SchedulerPPMixin:
    def event_loop_pp(self) -> None:
        self.transport = TRANSPORTS[self.cfg.pp_comm_mode](self.pp)
        self.gather_group = self.tp if self.ctx.tp_size > 1 else None
        self.stage_busy: list[float] = []
        if not self.ctx.is_first_stage:
            self._later_stage_loop()
        elif self.ctx.tp_rank == 0:
            self._first_stage_loop()
        else:
            self._first_stage_follower_loop()

    # ---- stage 0, TP rank 0: decides --------------------------------------------------------------
    def _first_stage_loop(self) -> None:
        inflight: deque[InFlight] = deque()
        mb_id, idle_since = 0, time.monotonic()
        running = True
        while running or inflight:
            idle = not inflight and not self.scheduler.has_work
            running = running and self.accept_requests(self.cfg.keepalive_s if idle else 0.0)
            while running and len(inflight) < self.cfg.num_microbatches:
                built = self.scheduler.next_microbatch(mb_id)
                if built is None:
                    break
                inflight.append(self._launch(*built))
                mb_id, idle_since = mb_id + 1, time.monotonic()
            if running and not inflight and time.monotonic() - idle_since >= self.cfg.keepalive_s:
                inflight.append(self._launch(BatchDescriptor.control("keepalive", mb_id), []))
                mb_id, idle_since = mb_id + 1, time.monotonic()
            if inflight:
                self._complete(inflight.popleft())
        self._complete(self._launch(BatchDescriptor.control("shutdown", mb_id), []))

    def _launch(self, desc: BatchDescriptor, reqs: list[Req]) -> InFlight:
        if self.ctx.tp_size > 1:
            self.tp.broadcast_object(desc.to_dict(), src=0)
        out = self.runner.forward(desc, None) if desc.kind == "batch" else {}
        if self.ctx.pp_size == 1:
            return InFlight(desc, reqs, result=out)
        # NOTE: the tokens' receive is posted now, before this rank computes anything else.
        sends = self._send_forward(desc, out, [self.runner.busy_s])
        expected = self.transport.expect(Channel.TOKENS, src=self.ctx.pp_size - 1)
        return InFlight(desc, reqs, sends, expected)

    def _complete(self, rec: InFlight) -> None:
        tokens = rec.result
        if tokens is None:
            tokens = self.transport.complete(rec.expected, self.cfg.p2p_timeout_s)
            if tokens["mb_id"] != rec.desc.mb_id:
                raise RuntimeError(
                    f"tokens of microbatch {tokens['mb_id']} arrived; expected {rec.desc.mb_id}"
                )
            self.stage_busy = tokens["busy"]
        else:
            self.stage_busy = [self.runner.busy_s]
        for w in rec.sends:
            w.wait()
        if rec.desc.kind == "batch":
            self.apply_result(rec, tokens)

    # ---- stage 0, TP ranks > 0: follow rank 0's broadcasts ------------------------------------------
    def _first_stage_follower_loop(self) -> None:
        sends: list[Any] = []
        while True:
            desc = BatchDescriptor.from_dict(self.tp.broadcast_object(None, src=0))
            out = self.runner.forward(desc, None) if desc.kind == "batch" else {}
            if self.ctx.pp_size > 1:
                self._wait_all(sends)
                sends = self._send_forward(desc, out, [self.runner.busy_s])
            if desc.kind == "shutdown":
                self._wait_all(sends)
                return

    # ---- stages > 0 ----------------------------------------------------------------------------------
    def _later_stage_loop(self) -> None:
        idle_timeout = 2 * self.cfg.keepalive_s + self.cfg.p2p_timeout_s
        expected = self._expect_proxy()
        sends: list[Any] = []
        while True:
            data = self.transport.complete(expected, idle_timeout)
            desc = BatchDescriptor.from_dict(data)
            if desc.kind != "shutdown":
                expected = self._expect_proxy()  # posted before this microbatch's compute
            out = self.runner.forward(desc, data) if desc.kind == "batch" else {}
            busy = [*data["busy"], self.runner.busy_s]
            self._wait_all(sends)
            if not self.ctx.is_last_stage:
                sends = self._send_forward(desc, out, busy)
            elif self.ctx.tp_rank == 0:
                reply = {"kind": desc.kind, "mb_id": desc.mb_id, "busy": busy, **out}
                sends = self.transport.send(reply, Channel.TOKENS, dst=0)
            if desc.kind == "shutdown":
                self._wait_all(sends)
                return

    def _expect_proxy(self) -> Expected:
        return self.transport.expect(Channel.PROXY, self.pp.prev_rank, self.gather_group, NO_SPLIT)

    def _send_forward(self, desc: BatchDescriptor, proxy: dict, busy: list[float]) -> list[Any]:
        payload = {**desc.to_dict(), "busy": busy, **proxy}
        return self.transport.send(
            payload, Channel.PROXY, self.pp.next_rank, self.gather_group, NO_SPLIT
        )

    def _wait_all(self, works: list[Any]) -> None:
        for w in works:
            w.wait(self.cfg.p2p_timeout_s)
