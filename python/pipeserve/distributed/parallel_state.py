"""Process groups of a `pp_size x tp_size` grid, set up once per process and read through accessors.

Global rank = pp_rank * tp_size + tp_rank. Each rank belongs to one TP group (the ranks of its stage)
and one PP group (the ranks of its TP index across stages).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeserve.distributed.coordinator import (
    DEFAULT_HEADER_TIMEOUT_S,
    GroupCoordinator,
)
from pipeserve.distributed.wire import DEFAULT_MAX_MESSAGE_BYTES, Channel, Limits

# Channels that carry device tensors between stages; each gets its own NCCL communicator on CUDA.
DEVICE_CHANNELS = (Channel.PROXY, Channel.TOKENS)
GLOO_TIMEOUT = datetime.timedelta(seconds=DEFAULT_HEADER_TIMEOUT_S)


@dataclass(frozen=True)
class DistConfig:
    pp_size: int = 1
    tp_size: int = 1
    rank: int = 0
    init_method: str | None = None  # "tcp://host:port"; None reads MASTER_ADDR/MASTER_PORT/RANK
    device: str = "cpu"  # "cpu" or "cuda"
    local_rank: int = 0  # CUDA device index of this rank
    timeout_s: float | None = None  # None: PIPESERVE_P2P_TIMEOUT or 60 (default_timeout_s)
    init_timeout_s: float = 300.0
    # tensor bytes one received message may declare; size it from the model (proxy_message_bytes)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def world_size(self) -> int:
        return self.pp_size * self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def __post_init__(self) -> None:
        if self.pp_size < 1 or self.tp_size < 1:
            raise ValueError(
                f"pp_size and tp_size must be >= 1, got {self.pp_size} and {self.tp_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")


@dataclass(frozen=True)
class ParallelState:
    config: DistConfig
    world: GroupCoordinator
    tp: GroupCoordinator
    pp: GroupCoordinator


_STATE: ParallelState | None = None


def _make_coordinator(
    name: str,
    all_ranks: list[list[int]],
    channels: tuple[Channel, ...],
    cfg: DistConfig,
    device: torch.device,
    timeout: datetime.timedelta,
) -> GroupCoordinator:
    """Creates the process groups of every group in `all_ranks` (new_group is collective: every rank
    creates every group, in the same order) and returns the coordinator of the one holding this rank."""
    mine = None
    for ranks in all_ranks:
        # NOTE: gloo waits are bounded by heartbeats (liveness.py) and closed connections, not by
        # a deadline that a long but live compute could outlast
        cpu_group = dist.new_group(ranks, backend="gloo", timeout=GLOO_TIMEOUT)
        device_groups = {}
        if cfg.device == "cuda":
            device_groups = {
                ch: dist.new_group(ranks, backend="nccl", timeout=timeout) for ch in channels
            }
        # NOTE: on CPU the forward's collectives get a gloo group of their own: the forward may
        # run on a worker thread while the loop broadcasts on cpu_group, and two threads must
        # never interleave collectives on one group
        compute_group = None
        if cfg.device == "cpu" and len(ranks) > 1:
            compute_group = dist.new_group(ranks, backend="gloo", timeout=GLOO_TIMEOUT)
        if cfg.rank in ranks:
            mine = GroupCoordinator(
                ranks,
                cpu_group,
                device_groups,
                device,
                name,
                cfg.timeout_s,
                compute_group,
                limits=Limits(max_message_bytes=cfg.max_message_bytes),
            )
    assert mine is not None
    return mine


def init_distributed(cfg: DistConfig) -> ParallelState:
    """Joins the world and builds the world, TP and PP coordinators of this rank."""
    global _STATE
    if _STATE is not None:
        raise RuntimeError("pipeserve.distributed is already initialised in this process")
    device = torch.device("cpu")
    if cfg.device == "cuda":
        torch.cuda.set_device(cfg.local_rank)
        device = torch.device("cuda", cfg.local_rank)
    timeout = datetime.timedelta(seconds=cfg.init_timeout_s)
    dist.init_process_group(
        backend="gloo",
        init_method=cfg.init_method or "env://",
        rank=cfg.rank,
        world_size=cfg.world_size,
        timeout=timeout,
    )
    P, T = cfg.pp_size, cfg.tp_size
    tp_groups = [[p * T + t for t in range(T)] for p in range(P)]
    pp_groups = [[p * T + t for p in range(P)] for t in range(T)]
    _STATE = ParallelState(
        config=cfg,
        world=_make_coordinator("world", [list(range(P * T))], (), cfg, device, timeout),
        tp=_make_coordinator("tp", tp_groups, (Channel.PROXY,), cfg, device, timeout),
        pp=_make_coordinator("pp", pp_groups, DEVICE_CHANNELS, cfg, device, timeout),
    )
    return _STATE


def _state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "pipeserve.distributed is not initialised: call init_distributed() first"
        )
    return _STATE


def get_world_group() -> GroupCoordinator:
    return _state().world


def get_tp_group() -> GroupCoordinator:
    return _state().tp


def get_pp_group() -> GroupCoordinator:
    return _state().pp


def get_parallel_config() -> DistConfig:
    return _state().config


def is_initialized() -> bool:
    return _STATE is not None


def destroy_distributed() -> None:
    global _STATE
    _STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()
