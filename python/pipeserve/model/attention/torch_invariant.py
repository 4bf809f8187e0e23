"""The `torch` backend of deterministic mode: attention whose reduction for a query depends on that
query's position and keys alone, never on its batch, on whether it decodes or extends, or on how
its prompt was chunked.

For a query at position p the keys 0..p are cut into chunks of CHUNK positions starting at 0 (the
last chunk padded with masked keys), whatever else is in the batch:

    s = q . k * scale        one row of a matmul of whole row blocks (fp32)
    m = max(s)               exact in any order
    e = exp(s - m)           masked keys give exactly 0
    out = (sum_c e_c @ v_c) / (sum_c sum(e_c))   chunk by chunk, in chunk order

Decodes and extends build the same rows: a query token's heads that share a KV head are rows of
that head's matmul, padded with zero rows to whole row blocks. Padding keys (a shorter request in a
decode batch, the causal future of an extend) add exact zeros, so the key length of the call does
not show in the result. Extends are attended one request at a time, in blocks of QUERY_BLOCK
tokens over the keys up to the block's last position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeserve.model.attention.base import AttentionBackend, register
from pipeserve.model.batch_invariant import pad_rows
from pipeserve.model.forward_batch import ForwardBatch

CHUNK = 64  # key positions per chunk of the softmax sums
QUERY_BLOCK = 128  # extend tokens attended per call (bounds the score matrix)


@dataclass
class Queries:
    """Query tokens attended together: rows of q, their positions, the keys' slots."""

    rows: torch.Tensor  # (T,) int64 rows of q
    positions: torch.Tensor  # (T,) int64 position of each query token
    slots: torch.Tensor  # (B, L) int64, L a multiple of CHUNK, padded with slot 0
    per_request: bool  # True: B == 1, every token attends `slots[0]`; False: B == T, one each


def _round_up(n: int) -> int:
    return max(CHUNK, -(-n // CHUNK) * CHUNK)


def build_queries(
    req_to_token: torch.Tensor,
    req_pool_idx: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    device: torch.device,
) -> list[Queries]:
    """The decodes of a batch as one group, each extend as groups of QUERY_BLOCK tokens."""
    decode, groups, row = [], [], 0
    for req, prefix, n in zip(req_pool_idx, prefix_lens, extend_lens, strict=True):
        if n == 1:
            decode.append((row, req, prefix))
        for start in range(0, n if n > 1 else 0, QUERY_BLOCK):
            count = min(QUERY_BLOCK, n - start)
            keys = prefix + start + count
            slots = torch.zeros(1, _round_up(keys), dtype=torch.int64)
            slots[0, :keys] = req_to_token[req, :keys].cpu()
            positions = torch.arange(prefix + start, prefix + start + count)
            rows = torch.arange(row + start, row + start + count)
            groups.append(Queries(rows.to(device), positions.to(device), slots.to(device), True))
        row += n
    if decode:
        keys = max(p + 1 for _, _, p in decode)
        slots = torch.zeros(len(decode), _round_up(keys), dtype=torch.int64)
        for i, (_, req, prefix) in enumerate(decode):
            slots[i, : prefix + 1] = req_to_token[req, : prefix + 1].cpu()
        rows = torch.tensor([r for r, _, _ in decode], dtype=torch.int64)
        positions = torch.tensor([p for _, _, p in decode], dtype=torch.int64)
        groups.insert(0, Queries(rows.to(device), positions.to(device), slots.to(device), False))
    return groups


def attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: Queries, scale: float
) -> torch.Tensor:
    """q (T, H, D) of the group's tokens -> (T, H, D) in q's dtype."""
    t, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    g = heads // kv_heads
    keys = k_cache.index_select(0, group.slots.view(-1)).view(*group.slots.shape, kv_heads, d)
    values = v_cache.index_select(0, group.slots.view(-1)).view(*group.slots.shape, kv_heads, d)
    # contiguous fp32 operands: every call hands MKL the same layouts
    keys, values = (x.transpose(1, 2).float().contiguous() for x in (keys, values))
    # (B, Hkv, R, D): R = g rows per token (one batch entry each), or T * g (one request)
    qg = q.float().view(t, kv_heads, g, d).transpose(0, 1)  # (Hkv, T, g, D)
    if group.per_request:
        qg = qg.reshape(1, kv_heads, t * g, d)
        q_pos = group.positions.repeat_interleave(g).view(1, 1, t * g, 1)
    else:
        qg = qg.transpose(0, 1)  # (T, Hkv, g, D)
        q_pos = group.positions.view(t, 1, 1, 1)
    # whole row blocks: each matmul row is then reduced by one kernel (batch_invariant.py)
    rows, qg = qg.shape[2], pad_rows(qg, dim=2).contiguous()
    if group.per_request:  # a decode's positions are one per batch entry, broadcast
        q_pos = pad_rows(q_pos, dim=2)
    out = _chunked_softmax_attention(qg, keys, values, q_pos, scale)[:, :, :rows]
    if group.per_request:
        out = out.view(kv_heads, t, g, d).transpose(0, 1)
    return out.reshape(t, heads, d).to(q.dtype)


def _chunked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (B, Hkv, R, D), k and v (B, Hkv, L, D) fp32, q_pos (B or 1, 1, R, 1) -> (B, Hkv, R, D)."""
    b, kv_heads, rows, d = q.shape
    length = k.shape[2]
    chunks = length // CHUNK
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, Hkv, R, L)
    key_pos = torch.arange(length, device=q.device).view(1, 1, 1, length)
    scores.masked_fill_(key_pos > q_pos, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights.view(b, kv_heads, rows, chunks, CHUNK)
    sums = weights.sum(dim=-1)  # (B, Hkv, R, chunks)
    per_chunk = torch.matmul(
        weights.transpose(2, 3).contiguous(), v.reshape(b, kv_heads, chunks, CHUNK, d)
    )  # (B, Hkv, chunks, R, D)
    out, total = per_chunk[:, :, 0], sums[..., 0]
    for c in range(1, chunks):  # in chunk order: trailing all-masked chunks add exact zeros
        out = out + per_chunk[:, :, c]
        total = total + sums[..., c]
    return out / total.unsqueeze(-1)


@register("torch_invariant")
class TorchInvariantBackend(AttentionBackend):
    def prepare_metadata(self, batch: ForwardBatch) -> None:
        batch.attn = build_queries(
            self.req_to_token,
            batch.host_req_pool_idx.tolist(),
            batch.host_prefix_lens.tolist(),
            batch.host_extend_lens.tolist(),
            self.spec.device,
        )

    def forward(self, q, k, v, kv, batch, scale):
        out = torch.empty_like(q)
        for group in batch.attn:
            out.index_copy_(0, group.rows, attend(q.index_select(0, group.rows), *kv, group, scale))
        return out
