"""Server-sent events: one JSON object per event, encoded by msgspec (a streamed token costs one)."""

from __future__ import annotations

from typing import Any

import msgspec

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def sse_event(body: Any) -> bytes:
    return b"data: " + _json.encode(body) + b"\n\n"
