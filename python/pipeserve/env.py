"""Every `PIPESERVE_*` variable the engine reads, parsed and checked in one place. Read when a
process starts its work (`Env.read()`), never at import; a malformed value is a ValueError naming
the variable. (`PIPESERVE_P2P_TIMEOUT`, the P2P layer's default bound for callers outside the
engine, is read by `pipeserve.distributed`, which depends on nothing else of pipeserve.)"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

PP_LAYER_PARTITION = (
    "PIPESERVE_PP_LAYER_PARTITION"  # layers per stage, "a,b,...": --pp-layer-partition
)
TRACE = "PIPESERVE_TRACE"  # a path: --pp-trace
PROFILE_DIR = "PIPESERVE_PROFILE_DIR"  # each rank's loop runs under cProfile, written here
DEBUG_SLOW_FORWARD = "PIPESERVE_DEBUG_SLOW_FORWARD"  # "<rank>:<seconds>:<count>", for tests
GEMV_MAX_ROWS = "PIPESERVE_GEMV_MAX_ROWS"  # rows the one-row projection kernels take, 0-4
PDL = "PIPESERVE_PDL"  # 0: deterministic mode launches without programmatic dependent launch
WEIGHT_PREFETCH = "PIPESERVE_WEIGHT_PREFETCH"  # 1: its projections prefetch weights (experimental)
NARROW_TILES = "PIPESERVE_NARROW_TILES"  # 0: its few-row narrow projections on TABLE's tiles


@dataclass(frozen=True)
class SlowForward:
    """That rank's first `count` forwards each take `seconds` longer."""

    rank: int
    seconds: float
    count: int


@dataclass(frozen=True)
class Env:
    pp_layer_partition: str | None = None
    trace: str | None = None
    profile_dir: str | None = None
    slow_forward: SlowForward | None = None
    gemv_max_rows: int = 1
    pdl: bool = True
    weight_prefetch: bool = False
    narrow_tiles: bool = True

    @classmethod
    def read(cls, environ: Mapping[str, str] = os.environ) -> Env:
        return cls(
            pp_layer_partition=environ.get(PP_LAYER_PARTITION) or None,
            trace=environ.get(TRACE) or None,
            profile_dir=environ.get(PROFILE_DIR) or None,
            slow_forward=_slow_forward(environ.get(DEBUG_SLOW_FORWARD)),
            gemv_max_rows=gemv_max_rows(environ.get(GEMV_MAX_ROWS, "1")),
            pdl=_flag(PDL, environ.get(PDL), True),
            weight_prefetch=_flag(WEIGHT_PREFETCH, environ.get(WEIGHT_PREFETCH), False),
            narrow_tiles=_flag(NARROW_TILES, environ.get(NARROW_TILES), True),
        )


@functools.cache
def switches() -> Env:
    """This process's Env, read once: for the kernels' switches, consulted at every launch."""
    return Env.read()


def gemv_max_rows(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 4:
        raise ValueError(f"{GEMV_MAX_ROWS} must be a whole number 0-4, got {text!r}")
    return int(text)


def _flag(name: str, text: str | None, default: bool) -> bool:
    """0 or 1; unset or empty: the default."""
    if text is None or not text.strip():
        return default
    if text.strip() not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {text!r}")
    return text.strip() == "1"


def _slow_forward(text: str | None) -> SlowForward | None:
    if not text:
        return None
    try:
        rank, seconds, count = text.split(":")
        return SlowForward(int(rank), float(seconds), int(count))
    except ValueError:
        raise ValueError(
            f"{DEBUG_SLOW_FORWARD} must be <rank>:<seconds>:<count>, got {text!r}"
        ) from None
