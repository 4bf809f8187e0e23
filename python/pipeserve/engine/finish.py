"""When a request is done: EOS, stop token ids, stop strings, max_new_tokens, context length."""

from __future__ import annotations

from collections.abc import Callable

from pipeserve.engine.req import Req

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
        """Decodes only a window of recent tokens: a stop string that just completed lies inside it.
        Special tokens are kept or skipped as in the request's output text, which is what the
        stop strings are matched (and the text trimmed) against."""
        window = max(len(s) for s in req.params.stop) + STOP_WINDOW_EXTRA
        tail = self.decode(
            req.output_ids[-window:], skip_special_tokens=req.params.skip_special_tokens
        )
        for s in req.params.stop:
            if s in tail:
                return s
        return None
