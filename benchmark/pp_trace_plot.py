"""Per-stage busy fractions and a bubble plot (busy vs idle over time, one row per stage) from a
pipeline trace written by `--pp-trace` / PIPESERVE_TRACE (plain or gzipped JSON)."""

from __future__ import annotations

import gzip
import json
from typing import Any

Spans = dict[
    int, list[tuple[float, float]]
]  # stage -> [(start s from the window's start, length s)]


def read_events(trace_path: str) -> list[dict]:
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        return json.load(f)["traceEvents"]


def stage_intervals(trace_path: str, window: tuple[float, float]) -> Spans:
    """Forward spans (seconds from the window's start) per stage, clipped to `window` (epoch s)."""
    start, end = window[0] * 1e6, window[1] * 1e6
    spans: Spans = {}
    for e in read_events(trace_path):
        if e.get("ph") != "X" or e["name"] != "forward" or e["args"].get("rank") is None:
            continue
        a, b = max(e["ts"], start), min(e["ts"] + e["dur"], end)
        if b > a and e["tid"] % 2 == 1 and e["tid"] // 2 == 0:  # TP rank 0's device track
            spans.setdefault(e["pid"], []).append(((a - start) / 1e6, (b - a) / 1e6))
    return spans


def busy_fractions(spans: Spans, wall: float) -> list[float]:
    return [sum(d for _, d in spans.get(s, [])) / wall for s in range(max(spans, default=-1) + 1)]


def _draw(ax: Any, spans: Spans, limits: tuple[float, float], busy: list[float]) -> None:
    """One row per stage; adjacent forwards alternate in shade so that microbatches show."""
    for stage, intervals in spans.items():
        for shade, color in enumerate(("tab:blue", "tab:cyan")):
            ax.broken_barh(intervals[shade::2], (stage - 0.35, 0.7), color=color)
    ax.set_yticks(range(len(busy)), [f"stage {s}\n{b:.0%} busy" for s, b in enumerate(busy)])
    ax.set_xlim(*limits)
    ax.set_ylim(len(busy) - 0.5, -0.5)  # stage 0 on top


def plot_trace(
    trace_path: str,
    window: tuple[float, float],
    png: str,
    title: str,
    zoom: tuple[float, float] | None = None,
) -> list[float]:
    """Writes the bubble plot to `png` (when matplotlib is installed), with a second panel of the
    `zoom` interval (seconds from the window's start) when given; returns busy per stage."""
    spans = stage_intervals(trace_path, window)
    wall = window[1] - window[0]
    busy = busy_fractions(spans, wall)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return busy
    rows = 2 if zoom else 1
    fig, axes = plt.subplots(rows, 1, figsize=(10, rows * (1 + 0.6 * len(busy))), squeeze=False)
    _draw(axes[0][0], spans, (0, wall), busy)
    axes[0][0].set_title(title)
    axes[-1][0].set_xlabel("seconds (forward spans, alternate microbatches shaded; white is idle)")
    if zoom:
        axes[0][0].axvspan(*zoom, color="tab:red", alpha=0.15, lw=0)
        _draw_zoom(axes[1][0], trace_path, window, zoom)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return busy


def _draw_zoom(
    ax: Any, trace_path: str, window: tuple[float, float], zoom: tuple[float, float]
) -> None:
    """`zoom` (seconds from the window's start) on its own axis, busy counted within it."""
    spans = stage_intervals(trace_path, (window[0] + zoom[0], window[0] + zoom[1]))
    busy = busy_fractions(spans, zoom[1] - zoom[0])
    shifted = {s: [(a + zoom[0], d) for a, d in v] for s, v in spans.items()}
    _draw(ax, shifted, zoom, busy)
    ax.set_title(f"zoom on {zoom[0]:g}-{zoom[1]:g} s (shaded above)", fontsize=10)
