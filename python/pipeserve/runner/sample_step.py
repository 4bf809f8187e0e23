"""The last stage's sampling step: the sampled rows' columns as a SamplingBatch (branches decided
on the host), the penalty history from the token pool, and tokens out as device tensors plus
pinned host copies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeserve.model.forward_batch import to_device
from pipeserve.runner.sampler import (
    SampleOutput,
    SamplingBatch,
    SamplingFlags,
    TokenHistory,
    sample,
)
from pipeserve.scheduler.descriptor import (
    FLOAT_COL,
    INT_COL,
    BatchDescriptor,
    TokenReply,
    penalised,
    sampled_token_places,
    seq_lens,
)

if TYPE_CHECKING:
    from pipeserve.runner.model_runner import ModelRunner


@dataclass
class SampledTokens:
    """A microbatch's sampled tokens: `device` for the token pools, `host` (pinned) for the
    scheduler, filled once `ready` (a CUDA event; None on CPU) has passed."""

    device: dict[str, torch.Tensor]
    host: dict[str, torch.Tensor]
    ready: Any = None

    def wait(self) -> dict[str, torch.Tensor]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host

    @classmethod
    def of(cls, device_tensors: dict[str, torch.Tensor]) -> SampledTokens:
        """Starts the copies to the host; never waits."""
        first = next(iter(device_tensors.values()))
        if first.device.type == "cpu":
            return cls(device_tensors, device_tensors)
        host = {
            k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
            for k, v in device_tensors.items()
        }
        ready = torch.cuda.Event()
        ready.record()
        return cls(device_tensors, host, ready)


def sample_step(
    runner: ModelRunner,
    desc: BatchDescriptor,
    logits: torch.Tensor,
    places: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SampledTokens:
    """Samples the rows of `logits` and writes the tokens into the token pool at `places`
    ((row, position) device tensors; None: from the descriptor)."""
    picked = desc.sampled()
    ints, floats = desc.req_ints[picked], desc.req_floats[picked]
    flags = sampling_flags(ints, floats)
    if flags == PLAIN_GREEDY:  # the argmax alone: no columns to upload, no other kernel
        result = SampleOutput(logits.argmax(dim=-1), None, None, None)
    else:
        batch = sampling_batch(ints, floats, flags, runner.device)
        batch.eos_ids = runner.eos_ids
        if flags.any_penalties:
            batch.history = token_history(runner, ints)
        result = sample(logits, batch)
    tokens = TokenReply.tensors(result)
    # the new token's place in the pool: stage 0 reads it as the next input (pp = 1), the last
    # stage as penalty history
    if places is None:
        places = tuple(to_device(sampled_token_places(desc), runner.device))
    runner.tokens.write(*places, result.next_token_ids)
    if not runner.ctx.is_first_stage:  # sent on to stage 0 as device tensors: no host copy here
        return SampledTokens(tokens, tokens)
    return SampledTokens.of(tokens)


PLAIN_GREEDY = SamplingFlags()


def sampling_flags(ints: np.ndarray, floats: np.ndarray) -> SamplingFlags:
    """What the sampled rows need, from the host copies of their columns."""
    i, f = (lambda name: ints[:, INT_COL[name]]), (lambda name: floats[:, FLOAT_COL[name]])
    return SamplingFlags.from_columns(
        f("temperature"),
        f("top_p"),
        f("top_k"),
        penalised(floats),
        i("ban_eos").astype(bool),
        i("return_logprob").astype(bool),
        i("top_logprobs_num"),
    )


def sampling_batch(
    ints: np.ndarray, floats: np.ndarray, flags: SamplingFlags, device: torch.device
) -> SamplingBatch:
    """The sampled rows' per-request columns (see batch.REQ_*_COLUMNS) as a SamplingBatch."""
    dev_ints, dev_floats = to_device(ints, device), to_device(floats, device)
    fd = {name: dev_floats[:, c] for name, c in FLOAT_COL.items()}
    return SamplingBatch(
        temperature=fd["temperature"],
        top_p=fd["top_p"],
        top_k=fd["top_k"].to(torch.int64),
        min_p=fd["min_p"],
        repetition_penalty=fd["repetition_penalty"],
        frequency_penalty=fd["frequency_penalty"],
        presence_penalty=fd["presence_penalty"],
        seed=dev_ints[:, INT_COL["seed"]],
        step=dev_ints[:, INT_COL["step"]],
        top_logprobs_num=dev_ints[:, INT_COL["top_logprobs_num"]],
        return_logprob=dev_ints[:, INT_COL["return_logprob"]].bool(),
        ban_eos=dev_ints[:, INT_COL["ban_eos"]].bool(),
        flags=flags,
    )


def token_history(runner: ModelRunner, ints: np.ndarray) -> TokenHistory:
    """Every token of the sampled requests so far, read from the last stage's token pool."""
    lens = seq_lens(ints)
    width = int(lens.max())
    cols = np.stack([ints[:, INT_COL["req_pool_idx"]], lens, ints[:, INT_COL["prompt_len"]]])
    rows, lens, prompt_lens = to_device(cols, runner.device)
    position = torch.arange(width, device=runner.device)[None, :]
    ids = runner.tokens.ids[rows, :width].to(torch.int64)
    valid = position < lens[:, None]
    return TokenHistory(ids, valid, valid & (position >= prompt_lens[:, None]))
