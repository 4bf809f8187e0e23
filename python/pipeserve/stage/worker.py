"""A rank's role object: the PP loops plus, on stage 0's TP rank 0, the requests' way in and out."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeserve.config import EngineConfig
from pipeserve.distributed import GroupCoordinator
from pipeserve.distributed.liveness import Liveness
from pipeserve.ipc.messages import (
    AbortReq,
    GenerateBatch,
    GenerateReq,
    SchedulerSockets,
    ShutdownReq,
    StepOut,
    TokenOut,
)
from pipeserve.model.parallel import ParallelContext
from pipeserve.runner.model_runner import ModelRunner
from pipeserve.sampling_params import SamplingParams
from pipeserve.scheduler.req import Req
from pipeserve.scheduler.scheduler import SampledToken, Scheduler
from pipeserve.stage.pp_loop import InFlight, SchedulerPPMixin

logger = logging.getLogger("pipeserve.scheduler")


class StageWorker(SchedulerPPMixin):
    def __init__(
        self,
        cfg: EngineConfig,
        ctx: ParallelContext,
        pp: GroupCoordinator,
        tp: GroupCoordinator,
        runner: ModelRunner,
        liveness: Liveness | None = None,
        scheduler: Scheduler | None = None,
        sockets: SchedulerSockets | None = None,
    ) -> None:
        self.cfg, self.ctx, self.pp, self.tp, self.runner = cfg, ctx, pp, tp, runner
        self.liveness = liveness
        self.scheduler, self.sockets = scheduler, sockets
        self.reqs: dict[str, Req] = {}

    # ---- requests in -------------------------------------------------------------------------------
    def accept_requests(self, timeout_s: float) -> bool:
        """Takes queued front-end messages (waiting up to `timeout_s` for the first); False on shutdown."""
        outputs: list[TokenOut] = []
        for msg in self.sockets.recv_all(timeout_s):
            logger.debug("front end: %s", type(msg).__name__)
            if isinstance(msg, ShutdownReq):
                self._send(outputs)
                return False
            if isinstance(msg, GenerateReq):
                outputs.extend(self._add(msg))
            elif isinstance(msg, GenerateBatch):
                for req in msg.reqs:
                    outputs.extend(self._add(req))
            elif isinstance(msg, AbortReq):
                outputs.extend(self._abort(msg.rid))
        self._send(outputs)
        return True

    def _add(self, msg: GenerateReq) -> list[TokenOut]:
        """Queues a request; whatever is wrong with it becomes its error, never this rank's."""
        try:
            req = Req(
                msg.rid,
                list(msg.input_ids),
                SamplingParams.from_dict(msg.params),
                int(msg.seed) % (1 << 63),
                bool(msg.return_logprob),
                int(msg.top_logprobs_num),
                int(msg.priority),
            )
        except (ValueError, TypeError, OverflowError) as e:
            return [self._error(msg.rid, len(msg.input_ids), str(e))]
        params = req.params
        req.added_at = time.monotonic()
        if params.max_new_tokens == 0:
            return [
                TokenOut(
                    req.rid,
                    [],
                    finish_reason={"type": "length", "matched": None},
                    prompt_tokens=req.seq_len,
                )
            ]
        reason = self.scheduler.add(req)
        if reason is not None:
            return [self._error(msg.rid, len(msg.input_ids), reason)]
        self.reqs[req.rid] = req
        return []

    def _abort(self, rid: str) -> list[TokenOut]:
        req = self.reqs.get(rid)
        if req is None or not self.scheduler.abort(req):
            return []  # unknown or finished already; an in-flight one is reported when it returns
        del self.reqs[rid]
        return [self._final(req)]

    @staticmethod
    def _error(rid: str, prompt_tokens: int, reason: str) -> TokenOut:
        return TokenOut(
            rid,
            [],
            finish_reason={"type": "abort", "message": reason},
            prompt_tokens=prompt_tokens,
            error=reason,
        )

    # ---- results out -------------------------------------------------------------------------------
    def apply_result(self, rec: InFlight, tokens: dict) -> None:
        sampled = self.scheduler.process_result(rec.desc, rec.reqs, tokens)
        by_req = {id(s.req): s for s in sampled}
        outputs = []
        for req in rec.reqs:
            s = by_req.get(id(req))
            if req.aborted:
                if self.reqs.pop(req.rid, None) is not None:
                    outputs.append(self._final(req))
            elif s is not None:
                outputs.append(self._token_out(req, s))
                if req.finished:
                    self.reqs.pop(req.rid, None)
        idle = not self.scheduler.running and not self.scheduler.waiting
        self._send(outputs, force=idle)  # an idle engine's stats show every slot free again

    def _token_out(self, req: Req, s: SampledToken) -> TokenOut:
        return TokenOut(
            req.rid,
            [s.token_id],
            logprobs=None if s.logprob is None else [s.logprob],
            top_logprobs=None if s.top_logprobs is None else [[list(p) for p in s.top_logprobs]],
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            queue_time_s=self._queue_time(req),
        )

    @staticmethod
    def _queue_time(req: Req) -> float | None:
        """Seconds from arrival at stage 0 to its first launch, with its first token only."""
        if len(req.output_ids) != 1 or req.started_at is None:
            return None
        return req.started_at - req.added_at

    def _final(self, req: Req) -> TokenOut:
        return TokenOut(
            req.rid,
            [],
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
        )

    def _send(self, outputs: list[TokenOut], force: bool = False) -> None:
        if outputs or force:
            logger.debug("sending %d outputs", len(outputs))
            self.sockets.send(StepOut(outputs, self.stats()))

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "free_slots": s.slots.num_free,
            "num_slots": s.slots.size,
            "num_preemptions": s.num_preemptions,
            "num_microbatches": s.num_microbatches,
            "stage_busy_s": list(self.stage_busy),
        }
