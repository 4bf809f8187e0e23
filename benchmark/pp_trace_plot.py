"""Per-stage busy fractions and a bubble plot (busy vs idle over time, one row per stage) from a
pipeline trace written by `--pp-trace` / PIPESERVE_TRACE."""

from __future__ import annotations

import json


def stage_intervals(
    trace_path: str, window: tuple[float, float]
) -> dict[int, list[tuple[float, float]]]:
    """Forward spans (seconds from the window's start) per stage, clipped to `window` (epoch s)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    start, end = window[0] * 1e6, window[1] * 1e6
    spans: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") != "X" or e["name"] != "forward" or e["args"].get("rank") is None:
            continue
        a, b = max(e["ts"], start), min(e["ts"] + e["dur"], end)
        if b > a and e["tid"] % 2 == 1 and e["tid"] // 2 == 0:  # TP rank 0's device track
            spans.setdefault(e["pid"], []).append(((a - start) / 1e6, (b - a) / 1e6))
    return spans


def plot_trace(trace_path: str, window: tuple[float, float], png: str, title: str) -> list[float]:
    """Writes the bubble plot to `png` (when matplotlib is installed); returns busy per stage."""
    spans = stage_intervals(trace_path, window)
    wall = window[1] - window[0]
    busy = [sum(d for _, d in spans.get(s, [])) / wall for s in range(max(spans, default=-1) + 1)]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return busy
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(busy)))
    for stage, intervals in spans.items():
        ax.broken_barh(intervals, (stage - 0.35, 0.7), color="tab:blue")
    ax.set_yticks(range(len(busy)), [f"stage {s}\n{b:.0%} busy" for s, b in enumerate(busy)])
    ax.set_xlim(0, wall)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (forward spans; white is idle)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return busy
