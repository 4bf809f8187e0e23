"""Prometheus text exposition of the server's counters and the scheduler's latest stats."""

from __future__ import annotations

import time
from typing import Any


def _line(name: str, value: float, labels: dict[str, Any] | None = None) -> str:
    tags = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
    return f"{name}{{{tags}}} {value}" if tags else f"{name} {value}"


def render_metrics(frontend: Any) -> str:
    c, s = frontend.counters, frontend.stats
    uptime = max(time.time() - c.started, 1e-9)
    out = [
        "# HELP pipeserve_requests_total Finished requests by outcome.",
        "# TYPE pipeserve_requests_total counter",
        *(_line("pipeserve_requests_total", v, {"status": k}) for k, v in c.requests.items()),
        "# TYPE pipeserve_prompt_tokens_total counter",
        _line("pipeserve_prompt_tokens_total", c.prompt_tokens),
        "# TYPE pipeserve_generation_tokens_total counter",
        _line("pipeserve_generation_tokens_total", c.generation_tokens),
        "# HELP pipeserve_queue_depth Requests waiting for admission at stage 0.",
        "# TYPE pipeserve_queue_depth gauge",
        _line("pipeserve_queue_depth", s.get("waiting", 0)),
        "# TYPE pipeserve_running_requests gauge",
        _line("pipeserve_running_requests", s.get("running", 0)),
        "# TYPE pipeserve_unfinished_requests gauge",
        _line("pipeserve_unfinished_requests", len(frontend.queues)),
        "# TYPE pipeserve_kv_slots_free gauge",
        _line("pipeserve_kv_slots_free", s.get("free_slots", 0)),
        "# TYPE pipeserve_preemptions_total counter",
        _line("pipeserve_preemptions_total", s.get("num_preemptions", 0)),
        "# TYPE pipeserve_microbatches_total counter",
        _line("pipeserve_microbatches_total", s.get("num_microbatches", 0)),
        "# HELP pipeserve_stage_busy_seconds_total Seconds each pipeline stage spent computing.",
        "# TYPE pipeserve_stage_busy_seconds_total counter",
    ]
    busy = s.get("stage_busy_s", [])
    out += [
        _line("pipeserve_stage_busy_seconds_total", b, {"stage": i}) for i, b in enumerate(busy)
    ]
    out += [
        "# HELP pipeserve_stage_busy_ratio Busy seconds over uptime, per stage.",
        "# TYPE pipeserve_stage_busy_ratio gauge",
    ]
    out += [
        _line("pipeserve_stage_busy_ratio", round(b / uptime, 6), {"stage": i})
        for i, b in enumerate(busy)
    ]
    return "\n".join(out) + "\n"
