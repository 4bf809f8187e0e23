"""The body of one rank process: join the grid, load this rank's share, agree on the KV geometry,
report ready, run the PP loop, exit with `os._exit` (receiver threads may still be blocked)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from pipeserve.config import EngineConfig, RankSpec
from pipeserve.distributed import (
    DistConfig,
    get_pp_group,
    get_tp_group,
    get_world_group,
    init_distributed,
)
from pipeserve.distributed.liveness import Liveness
from pipeserve.env import Env
from pipeserve.ipc.sockets import SchedulerSockets
from pipeserve.model.config import ModelConfig
from pipeserve.model.eos import eos_token_ids
from pipeserve.model.parallel import ParallelContext
from pipeserve.runner.model_runner import ModelRunner
from pipeserve.scheduler.finish import FinishChecker
from pipeserve.scheduler.scheduler import Scheduler
from pipeserve.stage.worker import StageWorker
from pipeserve.utils import freeze_heap, run_profiled, set_process_title

logger = logging.getLogger("pipeserve.worker")


def run_rank(cfg: EngineConfig, spec: RankSpec, report: Any) -> None:
    """Process entry point; never returns."""
    _setup_process(cfg, spec)
    code = 0
    try:
        worker = _build(cfg, spec, report)
        freeze_heap()  # the model, tables, torch and Triton
        report.put(
            (
                "ready",
                spec.rank,
                {
                    "num_slots": worker.runner.kv.num_slots,
                    "context_length": worker.runner.context_length,
                    "vocab_size": worker.runner.model_cfg.vocab_size,
                },
            )
        )
        _run_loop(worker, spec.rank)
    except BaseException as e:
        code = 1
        text = traceback.format_exc()
        logger.error("rank %d failed: %s", spec.rank, e)
        report.put(("error", spec.rank, text))
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.1)  # let the report queue's feeder thread flush
    os._exit(code)


def _run_loop(worker: StageWorker, rank: int) -> None:
    """The PP loop; under cProfile when PIPESERVE_PROFILE_DIR is set (`run_profiled`)."""
    run_profiled(worker.event_loop_pp, Env.read().profile_dir, f"rank{rank}")


def _setup_process(cfg: EngineConfig, spec: RankSpec) -> None:
    set_process_title(f"pipeserve-rank{spec.rank}")
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"[rank {spec.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    _die_with_parent()
    # the launcher owns Ctrl-C and SIGTERM (also when a whole process group gets them): it drains,
    # then shuts the ranks down, killing what is left
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)


def _die_with_parent() -> None:
    """A rank never outlives its launcher, even one killed with SIGKILL (checked every second)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="pipeserve-parent-watch", daemon=True).start()


def _build(cfg: EngineConfig, spec: RankSpec, report: Any) -> StageWorker:
    dcfg = DistConfig(
        pp_size=cfg.pp_size,
        tp_size=cfg.tp_size,
        rank=spec.rank,
        init_method=spec.dist_init,
        device=cfg.device,
        local_rank=spec.local_rank,
        timeout_s=cfg.p2p_timeout_s,
    )
    init_distributed(dcfg)
    device = torch.device("cuda", spec.local_rank) if cfg.device == "cuda" else torch.device("cpu")
    model_cfg = ModelConfig.from_dir(cfg.model_path)
    ctx = ParallelContext(
        dcfg.tp_rank, cfg.tp_size, dcfg.pp_rank, cfg.pp_size, get_tp_group(), cfg.deterministic
    )
    # stage 0's scheduler checks for EOS; the last stage bans it before min_new_tokens
    eos = None
    if spec.rank == 0 or ctx.is_last_stage:
        eos = eos_token_ids(cfg.model_path, cfg.tokenizer_path)
    runner = ModelRunner(
        cfg, model_cfg, ctx, device, lambda m: report.put(("progress", spec.rank, m)), eos
    )
    slots = torch.tensor([runner.affordable_slots()], dtype=torch.int64)
    get_world_group().all_reduce(slots, op=dist.ReduceOp.MIN)  # one KV geometry on every stage
    runner.allocate_kv(int(slots))
    runner.warm_up()
    runner.capture_graphs()
    _slow_down_for_tests(runner, spec.rank)
    liveness = Liveness(dist.distributed_c10d._get_default_store(), spec.rank, cfg.p2p_timeout_s)
    scheduler = sockets = None
    if spec.rank == 0:
        finish = FinishChecker(eos, runner.context_length)
        scheduler = Scheduler(cfg, int(slots), runner.context_length, finish, model_cfg.vocab_size)
        sockets = SchedulerSockets(spec.ipc)
    return StageWorker(
        cfg, ctx, get_pp_group(), get_tp_group(), runner, liveness, scheduler, sockets
    )


def _slow_down_for_tests(runner: ModelRunner, rank: int) -> None:
    """PIPESERVE_DEBUG_SLOW_FORWARD="<rank>:<seconds>:<count>": that rank's first <count> forwards
    each take <seconds> longer, to show that a slow but live stage is not a dead one."""
    slow_forward = Env.read().slow_forward
    if slow_forward is None or slow_forward.rank != rank:
        return
    left = [slow_forward.count]
    forward = runner.forward

    def slow(*args: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            time.sleep(slow_forward.seconds)
        return forward(*args)

    runner.forward = slow
