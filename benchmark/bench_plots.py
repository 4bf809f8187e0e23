"""Figures of the benchmarks' JSON results (matplotlib, the `bench` extra): decode time against
batch size (bench_offline.py) and a served concurrency sweep (bench_serving.py). Each benchmark
calls these with `--plot PATH` after its run, or with `--plot-from JSON` to redraw saved results."""

from __future__ import annotations

import json
from typing import Any

ENGINES = {  # bench_offline's engine name: (legend label, line style)
    "pipeserve": ("pipeserve (CUDA graphs)", "o-"),
    "pipeserve-eager": ("pipeserve eager", "s-"),
    "transformers": ("transformers.generate", "^-"),
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _log_y(ax: Any) -> None:
    """A log y axis labelled in plain numbers (1, 2, 5, 10), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))


def decode_points(result: dict, engine: str) -> tuple[list[int], list[float]]:
    """(batch sizes, decode step ms) of one engine; the batch-1 row counts as batch 1."""
    points = [
        (1 if r["what"] == "batch1" else r["batch"], r["decode_step_ms"])
        for r in result["rows"]
        if r["engine"] == engine and r["what"] in ("batch1", "throughput")
    ]
    return [b for b, _ in sorted(points)], [ms for _, ms in sorted(points)]


def bound_points(result: dict) -> tuple[list[int], list[float]]:
    """The bandwidth floor at batch 1 (weights only), then each batch's bound (weights + KV)."""
    floor = next(s["floor_ms"] for s in result["summary"] if "floor_ms" in s)
    batches = [(s["batch"], s["bandwidth_bound_ms"]) for s in result["summary"] if "batch" in s]
    return [1, *[b for b, _ in batches]], [floor, *[ms for _, ms in batches]]


def _decode_panel(ax: Any, result: dict) -> None:
    for engine, (label, style) in ENGINES.items():
        xs, ys = decode_points(result, engine)
        if xs:
            ax.plot(xs, ys, style, label=label)
        if engine == "pipeserve":
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(6, -12))
    xs, ys = bound_points(result)
    ax.plot(xs, ys, "k--", label="bandwidth bound (weights + KV read)")
    meta = result["meta"]
    ax.set_title(f"{meta['shape'].upper()} shape, bf16, one {meta['gpu'] or meta['device']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    _log_y(ax)
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("decode step, ms (= ms per token of each request)")
    ax.grid(alpha=0.3, which="both")


def decode_figure(results: list[dict], path: str) -> None:
    """One panel per bench_offline result: decode step ms against batch size per engine, with
    the bandwidth floor as a line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        _decode_panel(ax, result)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _options(target: str) -> list[str]:
    """A launch label's words, a flag and its value as one "name=value" item."""
    items: list[str] = []
    for word in target.split():
        if (
            items
            and items[-1].startswith("--")
            and "=" not in items[-1]
            and not word.startswith("--")
        ):
            items[-1] += "=" + word
        else:
            items.append(word)
    return items


def short_labels(targets: list[str]) -> dict[str, str]:
    """Each target label less the options all of them share: "pp-size=2" for "pipeserve ...
    --pp-size 2" beside "pipeserve ... --pp-size 1"."""
    options = {t: _options(t) for t in targets}
    shared = set.intersection(*(set(o) for o in options.values())) if len(targets) > 1 else set()
    short = {
        t: " ".join(x.removeprefix("--") for x in o if x not in shared) for t, o in options.items()
    }
    return {t: s or t for t, s in short.items()}


def _serving_panels(axes: Any, rows: list[dict], key: str) -> None:
    targets = list(dict.fromkeys(r["target"] for r in rows))
    for i, (target, label) in enumerate(short_labels(targets).items()):
        color = f"C{i}"
        mine = [r for r in rows if r["target"] == target]
        xs = [r[key] for r in mine]
        axes[0].plot(xs, [r["output_tok_per_s"] for r in mine], "o-", color=color, label=label)
        offline = mine[0].get("offline_output_tok_per_s")
        if offline:
            axes[0].axhline(offline, color=color, ls=":", label=f"{label}: offline Engine")
        for ax, metric in ((axes[1], "ttft_ms"), (axes[2], "tpot_ms")):
            ax.plot(xs, [r[f"{metric}_p50"] for r in mine], "o-", color=color, label=f"{label} p50")
            ax.plot(
                xs, [r[f"{metric}_p99"] for r in mine], "x--", color=color, label=f"{label} p99"
            )


def serving_figure(rows: list[dict], path: str, title: str | None = None) -> None:
    """Served output tokens/s, TTFT and TPOT (p50 solid, p99 dashed) against concurrency (or
    request rate), one line per server configuration."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    key = "concurrency" if rows[0]["concurrency"] is not None else "request_rate"
    _serving_panels(axes, rows, key)
    titles = ("served output tokens/s", "time to first token, ms", "time per output token, ms")
    for ax, name in zip(axes, titles, strict=True):
        xs = sorted({r[key] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel("concurrent clients" if key == "concurrency" else "requests/s")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _log_y(axes[1])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
