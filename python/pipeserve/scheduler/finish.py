"""When stage 0 ends a request: EOS, stop token ids, max_new_tokens, context length. Stop strings
are text, matched by the front end (frontend/detokenizer.py), which then aborts the request here."""

from __future__ import annotations

from pipeserve.scheduler.req import Req


class FinishChecker:
    def __init__(self, eos_ids: set[int], context_length: int) -> None:
        self.eos_ids = eos_ids
        self.context_length = context_length

    def __call__(self, req: Req) -> dict | None:
        p = req.params
        token = req.output_ids[-1]
        n = len(req.output_ids)
        if n >= p.min_new_tokens:
            if not p.ignore_eos and token in self.eos_ids:
                return {"type": "stop", "matched": token}
            if token in p.stop_token_ids:
                return {"type": "stop", "matched": token}
        if n >= p.max_new_tokens or len(req.prompt_ids) + n >= self.context_length:  # seq_len
            return {"type": "length", "matched": None}
        return None
