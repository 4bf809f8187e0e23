"""A rank's role object: the PP loops plus, on stage 0's TP rank 0, the requests' way in and out."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeserve.config import EngineConfig
from pipeserve.distributed import GroupCoordinator
from pipeserve.distributed.liveness import Liveness
from pipeserve.ipc.messages import AbortReq, GenerateBatch, GenerateReq, ShutdownReq
from pipeserve.ipc.sockets import SchedulerSockets
from pipeserve.model.parallel import ParallelContext
from pipeserve.runner.model_runner import ModelRunner
from pipeserve.sampling_params import SamplingParams
from pipeserve.scheduler.descriptor import TokenReply
from pipeserve.scheduler.images import VisionSpec, attach_images
from pipeserve.scheduler.req import Req
from pipeserve.scheduler.scheduler import Scheduler
from pipeserve.stage.outputs import Outputs, final_row, result_rows
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
        model_cfg = runner.model_cfg
        self.vision = VisionSpec.of(model_cfg.vision, model_cfg.image_token_id)

    # ---- requests in -------------------------------------------------------------------------------
    def accept_requests(self, timeout_s: float) -> bool:
        """Takes queued front-end messages (waiting up to `timeout_s` for the first); False on shutdown."""
        outputs = Outputs(self.sockets.num_frontends)
        for msg in self.sockets.recv_all(timeout_s):
            logger.debug("front end: %s", type(msg).__name__)
            if isinstance(msg, ShutdownReq):
                self._send(outputs)
                return False
            if isinstance(msg, GenerateReq):
                self._add(msg, outputs)
            elif isinstance(msg, GenerateBatch):
                for req in msg.reqs:
                    self._add(req, outputs)
            elif isinstance(msg, AbortReq):
                self._abort(msg.rid, outputs)
        self._send(outputs)
        return True

    def _add(self, msg: GenerateReq, outputs: Outputs) -> None:
        """Queues a request; whatever is wrong with it becomes its error, never this rank's."""
        owner = msg.owner if 0 <= msg.owner < self.sockets.num_frontends else 0
        try:
            req = Req(
                msg.rid,
                list(msg.input_ids),
                SamplingParams.from_dict(msg.params),
                int(msg.seed) % (1 << 63),
                bool(msg.return_logprob),
                int(msg.top_logprobs_num),
                int(msg.priority),
                owner=owner,
            )
            attach_images(req, msg.images, self.vision)
        except (ValueError, TypeError, OverflowError) as e:
            outputs.error(owner, msg.rid, len(msg.input_ids), str(e))
            return
        req.added_at = time.monotonic()
        if req.params.max_new_tokens == 0:
            length = {"type": "length", "matched": None}
            outputs[owner].add(req.rid, [], req.seq_len, 0, length)
            return
        reason = self.scheduler.add(req)
        if reason is not None:
            outputs.error(owner, msg.rid, len(msg.input_ids), reason)
            return
        self.reqs[req.rid] = req

    def _abort(self, rid: str, outputs: Outputs) -> None:
        req = self.reqs.get(rid)
        if req is None or not self.scheduler.abort(req):
            return  # unknown or finished already; an in-flight one is reported when it returns
        del self.reqs[rid]
        final_row(req, outputs[req.owner])

    # ---- results out -------------------------------------------------------------------------------
    def apply_result(self, rec: InFlight, tokens: dict) -> None:
        reply = TokenReply.from_tensors(tokens)
        sampled = self.scheduler.process_result(rec.desc, rec.reqs, reply)
        outputs = result_rows(rec.reqs, sampled, self.reqs, self.sockets.num_frontends)
        idle = not self.scheduler.running and not self.scheduler.waiting
        self._send(outputs, force=idle)  # an idle engine's stats show every slot free again

    def _send(self, outputs: Outputs, force: bool = False) -> None:
        """One message per front end that has rows (every front end when `force`), each with the
        stats."""
        stats = None
        for owner, rows in enumerate(outputs.builders):
            if len(rows) or force:
                rows.out.stats = stats = stats or self.stats()
                self.sockets.send(owner, rows.out)

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "free_slots": s.slots.available,  # cached slots that no request holds count as free
            "num_slots": s.slots.size,
            "cached_slots": s.slots.num_cached,
            "num_cached_tokens": s.slots.num_cached_tokens,
            "num_admitted_tokens": s.slots.num_admitted_tokens,
            "num_preemptions": s.num_preemptions,
            "num_microbatches": s.num_microbatches,
            "stage_busy_s": list(self.stage_busy),
        }
