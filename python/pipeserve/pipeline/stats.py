"""What a run did: per-column counts and tokens, a trace of every request, the times records
finished, a progress bar per column, and the summary printed at the end."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm


@dataclass
class ColumnStats:
    name: str
    to_run: int  # cells this run computes
    kept: int  # cells finished by an earlier run and kept
    done: int = 0
    failed: int = 0
    regenerated: int = 0  # answers generated again (unparsable, off-schema or rejected)
    requests: int = 0  # HTTP requests that carried this column's cells (retries not counted)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_start_s: float | None = None  # since the run started, LLM columns only
    last_end_s: float | None = None


@dataclass(frozen=True)
class RequestSpan:
    """One cell's request, retries included (cells sent together share it); seconds since the
    run started."""

    column: str
    endpoint: str
    record: int
    start_s: float
    end_s: float
    ok: bool


@dataclass
class RunSummary:
    wall_s: float
    records_written: int
    records_skipped: int  # finished by an earlier run
    columns: dict[str, ColumnStats]
    overlap_s: float  # time during which two or more endpoints had requests in flight
    records_unfinished: int = 0  # records with cells left when the run stopped early
    stopped: str | None = None  # why the run stopped before every record was written
    record_end_s: list[float] = field(default_factory=list)  # when each written record finished
    requests: list[RequestSpan] = field(default_factory=list)

    @property
    def cells_failed(self) -> int:
        return sum(c.failed for c in self.columns.values())

    def to_dict(self, with_trace: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_trace:
            out.pop("requests")
            out.pop("record_end_s")
        return out

    def format(self) -> str:
        head = f"{'column':<16}{'done':>8}{'failed':>8}{'kept':>8}{'again':>7}"
        lines = [head + f"{'prompt tok':>12}{'gen tok':>10}"]
        for c in self.columns.values():
            lines.append(
                f"{c.name:<16}{c.done:>8}{c.failed:>8}{c.kept:>8}{c.regenerated:>7}"
                f"{c.prompt_tokens:>12}{c.completion_tokens:>10}"
            )
        share = self.overlap_s / self.wall_s if self.wall_s > 0 else 0.0
        lines.append(
            f"{self.records_written} records written ({self.records_skipped} already done) in "
            f"{self.wall_s:.1f} s; endpoints overlapped {self.overlap_s:.1f} s ({share:.0%})"
        )
        if self.stopped is not None:
            lines.append(f"stopped: {self.stopped}")
        if self.stopped is not None or self.cells_failed:
            left = f"{self.records_unfinished} records not finished, " * (self.stopped is not None)
            lines.append(
                f"{left}{self.cells_failed} cells failed: run the same command again to resume "
                "(finished cells are kept)"
            )
        return "\n".join(lines)


class RunStats:
    def __init__(self, to_run: dict[str, int], kept: dict[str, int], progress: bool) -> None:
        self.columns = {n: ColumnStats(n, to_run[n], kept[n]) for n in to_run}
        self.records_skipped = 0
        self._t0 = time.perf_counter()
        self._requests: list[RequestSpan] = []
        self._record_end: list[float] = []
        self._bars = {}
        if progress:
            self._bars = {
                n: tqdm(total=to_run[n], desc=n, position=i, leave=True, dynamic_ncols=True)
                for i, n in enumerate(to_run)
            }

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def request(self, spans: list[RequestSpan], prompt_tokens: int, completion_tokens: int) -> None:
        """One request: a span per cell it carried, and its token usage."""
        c = self.columns[spans[0].column]
        c.requests += 1
        c.prompt_tokens += prompt_tokens
        c.completion_tokens += completion_tokens
        c.first_start_s = min(spans[0].start_s, c.first_start_s or spans[0].start_s)
        c.last_end_s = max(spans[0].end_s, c.last_end_s or 0.0)
        self._requests.extend(spans)

    def cell(self, column: str, ok: bool) -> None:
        c = self.columns[column]
        c.done += ok
        c.failed += not ok
        if bar := self._bars.get(column):
            bar.update(1)
            if c.failed:
                bar.set_postfix(failed=c.failed, refresh=False)

    def regenerated(self, column: str, counted: bool) -> None:
        """An answer goes for another generation; `counted`: it had been counted as done."""
        c = self.columns[column]
        c.regenerated += 1
        if counted:
            c.done -= 1
            if bar := self._bars.get(column):
                bar.update(-1)

    @property
    def written(self) -> int:
        return len(self._record_end)

    def record_written(self) -> None:
        self._record_end.append(self.now())

    def finish(self, stopped: str | None = None, unfinished: int = 0) -> RunSummary:
        for bar in self._bars.values():
            bar.close()
        return RunSummary(
            wall_s=self.now(),
            records_written=len(self._record_end),
            records_skipped=self.records_skipped,
            columns=self.columns,
            overlap_s=overlap_s(self._requests),
            records_unfinished=unfinished,
            stopped=stopped,
            record_end_s=self._record_end,
            requests=sorted(self._requests, key=lambda r: (r.start_s, r.record, r.column)),
        )


def overlap_s(requests: list[RequestSpan]) -> float:
    """Seconds during which requests to at least two different endpoints were in flight."""
    events = sorted(
        [(r.start_s, 1, r.endpoint) for r in requests]
        + [(r.end_s, -1, r.endpoint) for r in requests]
    )
    busy: dict[str, int] = {}
    total, last = 0.0, 0.0
    for t, step, endpoint in events:
        if sum(1 for n in busy.values() if n > 0) >= 2:
            total += t - last
        busy[endpoint] = busy.get(endpoint, 0) + step
        last = t
    return total
