"""Records in, records out. Input is JSON lines (one object per line). Output is appended one line
per record as each record finishes, flushed at once: the record's fields, every column's value
(null where it failed), `_index` (its line in the input), `_hash` (a digest of the input record),
`_usage` (per LLM column computed in this run: prompt and completion tokens, finish_reason,
generations) and `_errors` (column -> message) when a cell failed. NaN and infinities, which
JSON cannot hold, are written as null.

A record is known by its `id` field when it has one, else by its content: `_hash`, with `#k`
appended for the k-th repeat of an identical record. Resuming, the last line of each record
counts. A record whose last line has no errors is skipped; otherwise the columns that failed (and
those that read them) run again and the rest keep their values. A record whose `id` is known but
whose fields changed is computed again in full. The new line is appended, so nothing written is
lost.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from typing import IO, Any

from pipeserve.pipeline.frontier import RecordPlan
from pipeserve.pipeline.job.config import Job, JobError, LLMColumn

RESERVED = ("_index", "_hash", "_usage", "_errors")
Key = tuple[str, Any]


def read_records(path: str) -> list[dict[str, Any]]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise JobError(f"{path}:{number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise JobError(f"{path}:{number}: a record must be a JSON object")
            records.append(record)
    return records


def digest(record: dict[str, Any]) -> str:
    """A digest of an input record's content (field order does not matter)."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_hashes(records: list[dict[str, Any]]) -> list[str]:
    """Each record's `_hash`: its digest, with `#k` for the k-th repeat of identical content."""
    seen: dict[str, int] = {}
    out = []
    for record in records:
        d = digest(record)
        out.append(f"{d}#{seen[d]}" if seen.get(d) else d)
        seen[d] = seen.get(d, 0) + 1
    return out


def record_key(record: dict[str, Any], hashed: str) -> Key:
    """How resuming knows a record: its `id`, else its `_hash`."""
    return ("id", record["id"]) if "id" in record else ("hash", hashed)


def check_records(job: Job, records: list[dict[str, Any]]) -> None:
    """Raises `JobError` for the first record the job cannot run on, naming it and the field."""
    columns = {c.name for c in job.columns}
    seen: set[Any] = set()
    for index, record in enumerate(records):
        clash = sorted((set(record) & columns) | (set(record) & set(RESERVED)))
        if clash:
            raise JobError(
                f"record {index} has the field {clash[0]!r}, which is a column or reserved"
            )
        if "id" in record and not isinstance(record["id"], (str, int)):
            raise JobError(f"record {index}: id must be a string or an integer")
        if "id" in record and record["id"] in seen:
            raise JobError(f"record {index}: id {record['id']!r} is used by an earlier record")
        seen.add(record.get("id"))
        for col in job.columns:
            missing = [f for f in job.graph.field_refs[col.name] if f not in record]
            if missing and isinstance(col, LLMColumn):
                raise JobError(
                    f"column {col.name!r}: its prompt uses {{{missing[0]}}}, which is neither a "
                    f"column ({', '.join(sorted(columns))}) nor a field of record {index} "
                    f"({', '.join(record) or 'no fields'})"
                )


def read_output(path: str) -> dict[Key, dict[str, Any]]:
    """The last line written for each record; a torn last line (a killed run) is ignored."""
    last: dict[Key, dict[str, Any]] = {}
    if not os.path.exists(path):
        return last
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and ("id" in row or "_hash" in row):
                last[record_key(row, row.get("_hash", ""))] = row
    return last


def plan_records(
    job: Job, records: list[dict[str, Any]], finished: dict[Key, dict[str, Any]]
) -> list[RecordPlan]:
    """One plan per record that still has cells to compute; finished records get none. A line of
    the same `id` written for other fields is stale: that record runs in full."""
    names = [c.name for c in job.columns]
    plans = []
    for index, (record, hashed) in enumerate(zip(records, record_hashes(records), strict=True)):
        row = finished.get(record_key(record, hashed))
        if row is not None and row.get("_hash", hashed) != hashed:
            row = None
        if row is None:
            plans.append(RecordPlan(index, dict(record), set(names)))
            continue
        errors = row.get("_errors") or {}
        redo = {n for n in names if n in errors or n not in row}
        run = job.graph.downstream(redo)
        if run:
            kept = {n: row[n] for n in names if n not in run}
            plans.append(RecordPlan(index, {**record, **kept}, run))
    return plans


def output_row(
    job: Job,
    index: int,
    hashed: str,
    result: tuple[dict[str, Any], dict[str, str]],
    usage: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """A finished record's line: `result` is its (values, errors)."""
    values, errors = result
    names = {c.name for c in job.columns}
    row = {k: v for k, v in values.items() if k not in names}
    row.update({c.name: values.get(c.name) for c in job.columns})
    row["_index"] = index
    row["_hash"] = hashed
    if usage:
        row["_usage"] = usage
    if errors:
        row["_errors"] = dict(sorted(errors.items()))
    return row


class OutputWriter:
    """Appends one JSON line per record and flushes it, so a killed run keeps every line it wrote."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a")  # noqa: SIM115 - closed by close()
        self._torn = _ends_mid_line(path)

    def write(self, row: dict[str, Any]) -> None:
        prefix = "\n" if self._torn else ""
        self._torn = False
        line = json.dumps(finite(row), ensure_ascii=False, allow_nan=False)
        self._file.write(prefix + line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _ends_mid_line(path: str) -> bool:
    """True when a killed run left a partial last line; the next line must start on its own."""
    if os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def compact_output(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Rewrites the output with one line per record (its last), in input order; atomic."""
    records = list(records)
    last = read_output(path)
    keys = [record_key(r, h) for r, h in zip(records, record_hashes(records), strict=True)]
    rows = [last[k] for k in keys if k in last]
    tmp = f"{path}.compact"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)
    return len(rows)
