"""The batched sampler of the last pipeline stage: penalties, logprobs, filtering, seeded Gumbel-max.

Every op is a pure torch op on the logits' device, so CPU and CUDA run the same code. The only
randomness is a counter-based hash of (seed, step, token id): a row's token depends on nothing but
its own logits and parameters, never on its neighbours, the batch size or torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeserve.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF
# NOTE: multipliers are odd and < 2**31, and operands are masked to 32 bits, so every int64
# product stays below 2**63 (no signed overflow on any device).
_MUL_A = 0x7FEB352D
_MUL_B = 0x5BD1E995
_SALT_A = 0x2545F491
_SALT_B = 0x68E31DA4


@dataclass
class TokenHistory:
    """Tokens seen so far by each row, padded to the longest row (rows without penalties may be
    empty): every op on it is a fixed-shape scatter, with no host sync."""

    token_ids: torch.Tensor  # int64 [B, L]
    valid: torch.Tensor  # bool [B, L]  False on padding
    is_output: torch.Tensor  # bool [B, L]  True for generated tokens, False for prompt tokens


@dataclass(frozen=True)
class SamplingFlags:
    """What a batch needs, decided on the host from its parameter columns, so that the sampler
    never asks the device (no `bool(t.any())` syncs)."""

    any_penalties: bool = False
    all_greedy: bool = True
    needs_sort: bool = False  # some sampled row has top-k or top-p
    any_ban_eos: bool = False
    want_logprob: bool = False
    num_top_logprobs: int = 0

    @classmethod
    def from_columns(
        cls,
        temperature: np.ndarray,
        top_p: np.ndarray,
        top_k: np.ndarray,
        penalties: np.ndarray,
        ban_eos: np.ndarray,
        return_logprob: np.ndarray,
        top_logprobs_num: np.ndarray,
    ) -> SamplingFlags:
        greedy = (temperature == 0) | (top_k == 1)
        return cls(
            any_penalties=bool(penalties.any()),
            all_greedy=bool(greedy.all()),
            needs_sort=bool((~greedy & ((top_k > 0) | (top_p < 1.0))).any()),
            any_ban_eos=bool(ban_eos.any()),
            want_logprob=bool(return_logprob.any()),
            num_top_logprobs=int(top_logprobs_num.max()) if len(top_logprobs_num) else 0,
        )


@dataclass
class SamplingBatch:
    """Per-row sampling state of one batch; every tensor has B rows, on the logits' device."""

    temperature: torch.Tensor  # float32 [B]
    top_p: torch.Tensor  # float32 [B]
    top_k: torch.Tensor  # int64 [B]; <= 0 means disabled
    min_p: torch.Tensor  # float32 [B]
    repetition_penalty: torch.Tensor  # float32 [B]
    frequency_penalty: torch.Tensor  # float32 [B]
    presence_penalty: torch.Tensor  # float32 [B]
    seed: torch.Tensor  # int64 [B]  any int64; the scheduler assigns one to every request
    step: torch.Tensor  # int64 [B]  index of the output token being sampled (0 for the first)
    top_logprobs_num: torch.Tensor  # int64 [B]  0 = none
    return_logprob: torch.Tensor  # bool [B]
    history: TokenHistory | None = None  # needed only when some row has a penalty
    ban_eos: torch.Tensor | None = None  # bool [B]: rows that may not sample EOS (min_new_tokens)
    eos_ids: torch.Tensor | None = None  # int64 [E]: the model's EOS ids
    flags: SamplingFlags = field(default_factory=SamplingFlags)

    @property
    def has_penalties(self) -> torch.Tensor:
        """bool [B]: rows with a non-default penalty."""
        return (
            (self.repetition_penalty != 1.0)
            | (self.frequency_penalty != 0.0)
            | (self.presence_penalty != 0.0)
        )

    @property
    def is_greedy(self) -> torch.Tensor:
        """bool [B]: rows that take the argmax."""
        return (self.temperature == 0.0) | (self.top_k == 1)


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None  # float32 [B] logprob of the chosen token (None if no row asked)
    top_logprob_ids: torch.Tensor | None  # int64 [B, K] K = max top_logprobs_num (None if K == 0)
    top_logprobs: torch.Tensor | None  # float32 [B, K], sorted descending


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
    """Choose one token per row of `logits` (float [B, V]).

    Logprobs are the `log_softmax` of the logits after penalties (and the min_new_tokens EOS ban)
    but before temperature, top-k, top-p and min-p: they describe the model's (penalised)
    distribution, not the filtered one.
    `logprobs` and the top logprobs are filled for every row once any row asks; rows that asked for
    fewer than K top logprobs read only their first entries.
    """
    logits = ban_eos(apply_penalties(logits.float(), batch), batch)
    next_token_ids = _choose_tokens(logits, batch)
    logprobs, top_ids, top_values = _logprob_outputs(logits, next_token_ids, batch)
    return SampleOutput(next_token_ids, logprobs, top_ids, top_values)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (HF style); frequency and presence
    penalties over output tokens only (OpenAI style). Rows without penalties are returned as is."""
    if batch.history is None or not batch.flags.any_penalties:
        return logits
    has_penalties = batch.has_penalties
    seen, output_counts = _history_counts(batch.history, logits.shape)
    rep = batch.repetition_penalty[:, None]
    penalised = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    penalised = penalised - batch.frequency_penalty[:, None] * output_counts
    penalised = penalised - batch.presence_penalty[:, None] * (output_counts > 0).float()
    return torch.where(has_penalties[:, None], penalised, logits)


def ban_eos(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """EOS made impossible (-inf) in the rows that have not reached min_new_tokens."""
    if batch.ban_eos is None or batch.eos_ids is None or not batch.flags.any_ban_eos:
        return logits
    logits = logits.clone()
    eos = logits[:, batch.eos_ids]  # (B, E)
    logits[:, batch.eos_ids] = eos.masked_fill(batch.ban_eos[:, None], float("-inf"))
    return logits


def _history_counts(history: TokenHistory, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, V] token seen anywhere, float32 [B, V] number of times generated. Padding lands in
    an extra column that is cut off."""
    vocab = shape[-1]
    index = torch.where(history.valid, history.token_ids, vocab)
    seen = torch.zeros(shape[0], vocab + 1, dtype=torch.bool, device=index.device)
    seen.scatter_(1, index, True)
    counts = torch.zeros(shape[0], vocab + 1, dtype=torch.float32, device=index.device)
    counts.scatter_add_(1, index, (history.is_output & history.valid).float())
    return seen[:, :vocab], counts[:, :vocab]


def _choose_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    greedy_ids = logits.argmax(dim=-1)
    if batch.flags.all_greedy:
        return greedy_ids
    greedy = batch.is_greedy
    return torch.where(greedy, greedy_ids, _sample_tokens(logits, batch, greedy))


def _sample_tokens(
    logits: torch.Tensor, batch: SamplingBatch, greedy: torch.Tensor
) -> torch.Tensor:
    """Gumbel-max over the filtered, temperature-scaled logits; greedy rows get junk (masked later)."""
    temperature = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
    scaled = logits / temperature[:, None]
    keep = _min_p_keep(scaled, batch.min_p)
    if batch.flags.needs_sort:
        keep &= _top_k_top_p_keep(scaled, batch.top_k, batch.top_p)
    # float64 so that ties between (logit + noise) of different tokens are practically impossible
    scores = scaled.double().masked_fill(~keep, float("-inf"))
    scores += gumbel_noise(batch.seed, batch.step, logits.shape[-1])
    return scores.argmax(dim=-1)


def _min_p_keep(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """bool [B, V]: p >= min_p * p_max, written as logit - max_logit >= log(min_p)."""
    threshold = scaled.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return scaled >= threshold


def _top_k_top_p_keep(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """bool [B, V]: the k largest, then the smallest prefix of the renormalised top-k
    distribution whose mass reaches top_p. Rows with both disabled keep everything."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    position = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    k = torch.where(top_k > 0, top_k, scaled.shape[-1])[:, None]
    keep = position < k
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (position == 0)
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float64 [B, V] standard Gumbel noise, a pure function of (seed[b], step[b], token id).

    Within a row the 32-bit hash is a bijection of the token id, so no two tokens share a value.
    """
    key_a = _row_key(seed, step, _SALT_A)[:, None]
    key_b = _row_key(seed, step, _SALT_B)[:, None]
    token = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)[None, :]
    bits = _mix32(_mix32(token ^ key_a) ^ key_b)
    # (bits + 0.5) / 2**32 lies in the open interval (0, 1) and is exact in float64.
    u = (bits.double() + 0.5) * 2.0**-32
    # u and 1 - u are both uniform; -log1p(-u) = -log(1 - u) keeps precision for tiny u.
    return -torch.log(-torch.log1p(-u))


def _row_key(seed: torch.Tensor, step: torch.Tensor, salt: int) -> torch.Tensor:
    """int64 [B] in [0, 2**32): absorbs both 32-bit halves of the seed and the step."""
    key = _mix32((seed & _MASK32) ^ salt)
    key = _mix32(key ^ ((seed >> 32) & _MASK32))
    return _mix32(key ^ (step & _MASK32))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective multiply-xorshift mix of 32-bit values held in int64."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def _logprob_outputs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, batch: SamplingBatch
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    want_logprob = batch.flags.want_logprob
    num_top = min(batch.flags.num_top_logprobs, logits.shape[-1])
    if not want_logprob and num_top <= 0:
        return None, None, None
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, next_token_ids[:, None]).squeeze(-1) if want_logprob else None
    if num_top <= 0:
        return chosen, None, None
    top = logprobs.topk(num_top, dim=-1, sorted=True)
    return chosen, top.indices, top.values


def make_sampling_batch(
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    steps: Sequence[int],
    top_logprobs_num: Sequence[int],
    return_logprob: Sequence[bool],
    device: torch.device | str,
) -> SamplingBatch:
    """Stack per-request parameters into a SamplingBatch (history left None)."""
    sizes = {len(params), len(seeds), len(steps), len(top_logprobs_num), len(return_logprob)}
    if len(sizes) != 1:
        raise ValueError(f"per-row sequences must have equal lengths, got sizes {sorted(sizes)}")

    def column(values: Sequence[float | int | bool], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(list(values), dtype=dtype, device=device)

    flags = SamplingFlags.from_columns(
        np.array([p.temperature for p in params]),
        np.array([p.top_p for p in params]),
        np.array([p.top_k for p in params]),
        np.array([p.has_penalties for p in params], dtype=bool),
        np.zeros(len(params), dtype=bool),
        np.array(list(return_logprob), dtype=bool),
        np.array(list(top_logprobs_num), dtype=np.int64),
    )
    return SamplingBatch(
        temperature=column([p.temperature for p in params], torch.float32),
        top_p=column([p.top_p for p in params], torch.float32),
        top_k=column([p.top_k for p in params], torch.int64),
        min_p=column([p.min_p for p in params], torch.float32),
        repetition_penalty=column([p.repetition_penalty for p in params], torch.float32),
        frequency_penalty=column([p.frequency_penalty for p in params], torch.float32),
        presence_penalty=column([p.presence_penalty for p in params], torch.float32),
        seed=column([_wrap_int64(s) for s in seeds], torch.int64),
        step=column(steps, torch.int64),
        top_logprobs_num=column(top_logprobs_num, torch.int64),
        return_logprob=column(return_logprob, torch.bool),
        flags=flags,
    )


def _wrap_int64(value: int) -> int:
    """Any Python int as the int64 with the same low 64 bits."""
    return (value + 2**63) % 2**64 - 2**63


def make_token_history(
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    device: torch.device | str,
) -> TokenHistory:
    """Per-row token lists (empty for rows without penalties) as a padded TokenHistory."""
    if len(prompt_ids) != len(output_ids):
        raise ValueError(f"{len(prompt_ids)} prompt rows but {len(output_ids)} output rows")
    width = max([len(p) + len(o) for p, o in zip(prompt_ids, output_ids, strict=True)] + [1])
    ids = torch.zeros(len(prompt_ids), width, dtype=torch.int64)
    valid = torch.zeros(len(prompt_ids), width, dtype=torch.bool)
    is_output = torch.zeros(len(prompt_ids), width, dtype=torch.bool)
    for row, (prompt, output) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        n, p = len(prompt) + len(output), len(prompt)
        ids[row, :n] = torch.tensor([*prompt, *output], dtype=torch.int64)
        valid[row, :n] = True
        is_output[row, p:n] = True
    return TokenHistory(ids.to(device), valid.to(device), is_output.to(device))
