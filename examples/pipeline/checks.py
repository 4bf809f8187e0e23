"""Python columns of the arithmetic example job (named in job.yaml as `checks:verified`)."""

from __future__ import annotations

from typing import Any


def verified(row: dict[str, Any]) -> bool:
    """True when the judge's answer to `{sum}-{b}=` gives back `a`, i.e. the generated sum is
    right (or both models made errors that cancel, which the check cannot tell apart)."""
    try:
        return int(row["check"].strip()) == int(row["a"])
    except ValueError:
        return False
