"""Stage 0's outputs of one step: a StepOut per front end, with the rows of the requests it owns."""

from __future__ import annotations

from pipeserve.ipc.messages import StepOutBuilder
from pipeserve.scheduler.req import Req
from pipeserve.scheduler.scheduler import SampledToken


class Outputs:
    """One step's outputs, a StepOutBuilder per front end."""

    def __init__(self, num_frontends: int) -> None:
        self.builders = [StepOutBuilder() for _ in range(num_frontends)]

    def __getitem__(self, owner: int) -> StepOutBuilder:
        return self.builders[owner]

    def error(self, owner: int, rid: str, prompt_tokens: int, reason: str) -> None:
        """A request that never ran: its one row says why."""
        rows = self.builders[owner]
        row = rows.add(rid, [], prompt_tokens, 0, {"type": "abort", "message": reason})
        rows.out.errors[row] = reason


def result_rows(
    reqs: list[Req], sampled: list[SampledToken], live: dict[str, Req], num_frontends: int
) -> Outputs:
    """The rows of a returned microbatch: a token for each request that sampled one, a last row
    for each aborted one; requests that end here leave `live` (stage 0's requests by id)."""
    outputs = Outputs(num_frontends)
    by_req = {id(s.req): s for s in sampled}
    for req in reqs:
        s = by_req.get(id(req))
        if req.aborted:
            if live.pop(req.rid, None) is not None:
                final_row(req, outputs[req.owner])
        elif s is not None:
            _token_row(req, s, outputs[req.owner])
            if req.finished:
                live.pop(req.rid, None)
    return outputs


def final_row(req: Req, rows: StepOutBuilder) -> None:
    """The last row of a request that ends without a token (aborted): its finish reason."""
    rows.add(req.rid, [], len(req.prompt_ids), len(req.output_ids), req.finish_reason)


def _token_row(req: Req, s: SampledToken, rows: StepOutBuilder) -> None:
    row = rows.add(
        req.rid,
        [s.token_id],
        len(req.prompt_ids),
        len(req.output_ids),
        req.finish_reason,
        s.logprob,
        s.top_logprobs,
    )
    if len(req.output_ids) == 1 and req.started_at is not None:
        # seconds from arrival at stage 0 to its first launch, with its first token only
        rows.out.queue_times[row] = req.started_at - req.added_at
    if len(req.output_ids) == 1:
        rows.out.cached_tokens[row] = req.prompt_cached
