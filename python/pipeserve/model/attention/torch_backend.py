"""The `torch` backend: SDPA over K/V gathered from the token-slot pool, for CPU and as a fallback.

Every token of every request owns one slot of the stage's KV pool; `req_to_token[req, pos]` maps a
request's positions to slots. Decodes (one new token each) are attended as one padded batch;
extends (several new tokens, possibly after a cached prefix) as another padded batch when the
padding stays small, else one request at a time. The gathers make this backend copy K/V per layer;
the `triton` backend reads the pool in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeserve.model.attention.base import AttentionBackend, register
from pipeserve.model.forward_batch import ForwardBatch


@dataclass
class ExtendSpan:
    start: int  # first row of the request's new tokens in the batch
    length: int  # number of new tokens
    kv_slots: torch.Tensor  # (prefix + length,) slots of every position attended
    # (1, 1, length, prefix + length) bool; None: plain causal (no prefix)
    mask: torch.Tensor | None


@dataclass
class PaddedExtend:
    """Several extends as one (Be, Nmax) query batch over (Be, Lmax) keys."""

    rows: torch.Tensor  # (Be * Nmax,) batch row of each query slot; padding points at row 0
    valid: torch.Tensor  # (Be * Nmax,) bool: a real query
    kv_slots: torch.Tensor  # (Be, Lmax) slots attended, padded with slot 0
    mask: torch.Tensor  # (Be, 1, Nmax, Lmax) bool; padded queries see key 0 only (no NaN)


@dataclass
class AttentionBatch:
    out_slots: torch.Tensor  # (N,) int64: where each new token's K/V is written
    decode_rows: torch.Tensor  # (Bd,) rows of the single-token requests
    decode_slots: torch.Tensor  # (Bd, Lmax) int64, padded with slot 0
    decode_mask: torch.Tensor  # (Bd, 1, 1, Lmax) bool, True where attended
    extends: list[ExtendSpan]
    padded_extend: PaddedExtend | None = None
    # masks as SDPA takes them (additive, query heads grouped), made once per batch, not per layer
    prepared_masks: dict = field(default_factory=dict)


def build_attention_batch(
    req_to_token: torch.Tensor,
    req_pool_idx: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    out_slots: torch.Tensor,
    device: torch.device,
) -> AttentionBatch:
    """`req_to_token` must already hold this batch's new slots."""
    decode, extend = [], []
    row = 0
    for req, prefix, n in zip(req_pool_idx, prefix_lens, extend_lens, strict=True):
        (decode if n == 1 else extend).append((row, req, prefix, n))
        row += n
    decode_rows, decode_slots, decode_mask = _decode_part(
        req_to_token, [(r, q, p + 1) for r, q, p, _ in decode], device
    )
    batch = AttentionBatch(
        out_slots=out_slots.to(device=device, dtype=torch.int64),
        decode_rows=decode_rows,
        decode_slots=decode_slots,
        decode_mask=decode_mask,
        extends=[],
    )
    if len(extend) > 1 and _padding_is_small(extend):
        batch.padded_extend = _padded_extend(req_to_token, extend, device)
    else:
        batch.extends = [_extend_span(req_to_token, r, q, p, n, device) for r, q, p, n in extend]
    return batch


def _padding_is_small(extend: list[tuple[int, int, int, int]]) -> bool:
    """At most twice the real query-key pairs once padded to the longest request."""
    real = sum(n * (p + n) for _, _, p, n in extend)
    padded = len(extend) * max(n for *_, n in extend) * max(p + n for *_, p, n in extend)
    return padded <= 2 * real


def _padded_extend(
    req_to_token: torch.Tensor, extend: list[tuple[int, int, int, int]], device: torch.device
) -> PaddedExtend:
    nmax = max(n for *_, n in extend)
    lmax = max(p + n for *_, p, n in extend)
    rows = torch.zeros(len(extend), nmax, dtype=torch.int64)
    mask = torch.zeros(len(extend), nmax, lmax, dtype=torch.bool)
    slots = torch.zeros(len(extend), lmax, dtype=torch.int64)
    key_pos = torch.arange(lmax)
    for i, (row, req, prefix, n) in enumerate(extend):
        rows[i, :n] = torch.arange(row, row + n)
        mask[i, :n] = key_pos[None, :] <= torch.arange(prefix, prefix + n)[:, None]
        mask[i, n:, 0] = True
        slots[i, : prefix + n] = req_to_token[req, : prefix + n].cpu()
    valid = torch.arange(nmax)[None, :] < torch.tensor([n for *_, n in extend])[:, None]
    return PaddedExtend(
        rows.view(-1).to(device),
        valid.view(-1).to(device),
        slots.to(device),
        mask.unsqueeze(1).to(device),
    )


def _extend_span(
    req_to_token: torch.Tensor, row: int, req: int, prefix: int, n: int, device: torch.device
) -> ExtendSpan:
    total = prefix + n
    slots = req_to_token[req, :total].to(device=device, dtype=torch.int64)
    mask = None
    if prefix:
        key_pos = torch.arange(total, device=device)
        query_pos = torch.arange(prefix, total, device=device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None]
    return ExtendSpan(row, n, slots, mask)


def _decode_part(
    req_to_token: torch.Tensor, decode: list[tuple[int, int, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not decode:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.view(0, 0), torch.empty(0, 1, 1, 0, dtype=torch.bool, device=device)
    rows = torch.tensor([d[0] for d in decode], dtype=torch.int64)
    reqs = torch.tensor([d[1] for d in decode], dtype=torch.int64)
    lens = torch.tensor([d[2] for d in decode], dtype=torch.int64)
    lmax = int(lens.max())
    slots = req_to_token[reqs.to(req_to_token.device), :lmax].to(torch.int64)
    mask = torch.arange(lmax)[None, :] < lens[:, None]
    slots = slots.masked_fill(~mask.to(slots.device), 0)
    return rows.to(device), slots.to(device), mask[:, None, None, :].to(device)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache rows at `slots` (any shape), as (*slots.shape, heads, head_dim); index_select is
    several times faster than advanced indexing on CPU."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """q: (N, H, D); k, v: (N, Hkv, D) of the new tokens, already in the caches (slots, Hkv, D).
    Returns (N, H, D)."""
    all_decode = not batch.extends and batch.padded_extend is None
    out = q if all_decode else torch.empty_like(q)
    if batch.decode_rows.numel():
        qd = q if all_decode else q.index_select(0, batch.decode_rows)
        kd = _gather(k_cache, batch.decode_slots).transpose(1, 2)  # (Bd, Hkv, Lmax, D)
        vd = _gather(v_cache, batch.decode_slots).transpose(1, 2)
        od = _grouped_sdpa(qd.unsqueeze(1), kd, vd, batch, batch.decode_mask, scale).squeeze(1)
        if all_decode:
            return od
        out.index_copy_(0, batch.decode_rows, od)
    for span in batch.extends:
        rows = slice(span.start, span.start + span.length)
        if span.mask is None:  # causal over its own tokens: flash attention where available
            qe, ke, ve = (t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            oe = F.scaled_dot_product_attention(
                qe, ke, ve, is_causal=True, scale=scale, enable_gqa=True
            )
            out[rows] = oe.squeeze(0).transpose(0, 1)
            continue
        ke = _gather(k_cache, span.kv_slots).transpose(0, 1).unsqueeze(0)  # (1, Hkv, L, D)
        ve = _gather(v_cache, span.kv_slots).transpose(0, 1).unsqueeze(0)
        oe = _grouped_sdpa(q[rows].unsqueeze(0), ke, ve, batch, span.mask, scale)
        out[rows] = oe.squeeze(0)
    if batch.padded_extend is not None:
        _attend_padded(q, k_cache, v_cache, batch, scale, out)
    return out


def _grouped_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: AttentionBatch,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: (B, Lq, H, D); k, v: (B, Hkv, Lk, D); mask: (B or 1, 1, Lq, Lk) bool. Returns (B, Lq, H, D).

    The query heads that share a KV head ride as extra query rows of that head, so K and V are
    never repeated per query head (SDPA's own `enable_gqa` falls back to a kernel that repeats them
    and, on CUDA, waits for the device when a mask is given)."""
    B, Lq, H, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    qg = q.reshape(B, Lq, Hkv, g, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Lq * g, D)
    o = F.scaled_dot_product_attention(
        qg, k, v, attn_mask=_prepared_mask(batch, mask, g, q.dtype), scale=scale
    )
    return o.view(B, Hkv, Lq, g, D).permute(0, 2, 1, 3, 4).reshape(B, Lq, H, D)


def _prepared_mask(
    batch: AttentionBatch, mask: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """`mask` (bool, True where attended) as an additive mask of `dtype`, each query row repeated
    `group` times; cached on the batch, so every layer reuses it."""
    key = (id(mask), group, dtype)
    prepared = batch.prepared_masks.get(key)
    if prepared is None:
        b, _, lq, lk = mask.shape
        if group > 1 and lq > 1:
            mask = mask.unsqueeze(3).expand(b, 1, lq, group, lk).reshape(b, 1, lq * group, lk)
        prepared = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        prepared.masked_fill_(~mask, float("-inf"))
        batch.prepared_masks[key] = prepared
    return prepared


def _attend_padded(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    out: torch.Tensor,
) -> None:
    pe = batch.padded_extend
    be = pe.kv_slots.shape[0]
    nmax = pe.rows.numel() // be
    qe = q.index_select(0, pe.rows).view(be, nmax, *q.shape[1:])  # (Be, Nmax, H, D)
    ke = _gather(k_cache, pe.kv_slots).transpose(1, 2)  # (Be, Hkv, Lmax, D)
    ve = _gather(v_cache, pe.kv_slots).transpose(1, 2)
    oe = _grouped_sdpa(qe, ke, ve, batch, pe.mask, scale).reshape(be * nmax, *q.shape[1:])
    out.index_copy_(0, pe.rows[pe.valid], oe[pe.valid])


@register("torch")
class TorchBackend(AttentionBackend):
    def prepare_metadata(self, batch: ForwardBatch) -> None:
        batch.attn = build_attention_batch(
            self.req_to_token,
            batch.host_req_pool_idx.tolist(),
            batch.host_prefix_lens.tolist(),
            batch.host_extend_lens.tolist(),
            batch.out_slots,
            self.spec.device,
        )

    def forward(self, q, k, v, kv, batch, scale):
        return paged_attention(q, k, v, kv[0], kv[1], batch.attn, scale)
