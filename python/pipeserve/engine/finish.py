"""When a request is done: EOS, stop token ids, stop strings, max_new_tokens, context length."""

from __future__ import annotations

from collections.abc import Callable

from pipeserve.engine.req import Req
from pipeserve.engine.tokenizer import decoded_len, find_stop

STOP_WINDOW_EXTRA = 4  # tokens decoded beyond the longest stop string, for multi-token characters


class FinishChecker:
    def __init__(self, eos_ids: set[int], context_length: int, decode: Callable[..., str]) -> None:
        """`decode(ids, skip_special_tokens=...)`: a tokenizer's decode."""
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.decode = decode

    def __call__(self, req: Req) -> dict | None:
        p = req.params
        token = req.output_ids[-1]
        n = len(req.output_ids)
        if n >= p.min_new_tokens:
            if not p.ignore_eos and token in self.eos_ids:
                return {"type": "stop", "matched": token}
            if token in p.stop_token_ids:
                return {"type": "stop", "matched": token}
            if p.stop and (matched := self._stop_string(req)) is not None:
                return {"type": "stop", "matched": matched}
        if n >= p.max_new_tokens or req.seq_len >= self.context_length:
            return {"type": "length", "matched": None}
        return None

    def _stop_string(self, req: Req) -> str | None:
        """A stop string that ends in the newest token's text (earlier ones were checked before, or
        came before min_new_tokens allowed a stop). Decodes a window of recent tokens, with special
        tokens kept or skipped as in the request's output text, which stop strings are matched
        (and the text trimmed) against."""
        stops = req.params.stop
        window = req.output_ids[-(max(len(s) for s in stops) + STOP_WINDOW_EXTRA) :]
        skip = req.params.skip_special_tokens
        tail = self.decode(window, skip_special_tokens=skip)
        start = find_stop(
            tail, stops, decoded_len(self.decode(window[:-1], skip_special_tokens=skip))
        )
        if start is None:
            return None
        return next(s for s in stops if tail.startswith(s, start))
