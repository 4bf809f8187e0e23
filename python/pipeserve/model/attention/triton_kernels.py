"""Paged attention kernels in Triton: every key is read from the slot pool through `req_to_token`,
sequence lengths are data (so a decode launch has a fixed grid and can be captured in a CUDA graph),
and grouped-query attention reads each KV head once for all the query heads that share it.

Layouts: q (N, H, D); k_cache, v_cache (slots, Hkv, D); req_to_token (rows, max_len) int;
per request: req_pool_idx, seq_lens (keys attended, new tokens included), extend_lens and
extend_start (first row of the request's new tokens in q). New tokens' K/V are in the cache already.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """Exact float32 products for float32 models (parity tests); tensor-core defaults otherwise."""
    if IEEE:  # noqa: SIM108 - a constexpr branch, resolved when the kernel compiles
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _attend_block(
    qv, k_head, v_head, slots, mask_n, visible, offs_d, mask_d, stride_ks, stride_vs, scale,
    m_i, l_i, acc, IEEE: tl.constexpr,
):  # fmt: skip
    """One block of keys in an online softmax: K and V of `slots` gathered from one KV head of the
    pool, scores masked by `visible` (queries x keys); returns the updated (max, sum, output)."""
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_head + slots[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = tl.where(visible, _dot(qv, tl.trans(k), IEEE) * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet
    p = tl.exp(qk - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = tl.load(v_head + slots[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_split_kernel(
    q, k_cache, v_cache, req_to_token, req_pool_idx, seq_lens, part_out, part_lse,
    stride_qn, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_row,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One program per (request, KV head, split): the split's share of the keys, for every query
    head of the group at once. Writes the normalised partial output and its log-sum-exp."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(req_pool_idx + b).to(tl.int64)
    seq_len = tl.load(seq_lens + b)
    split_len = tl.cdiv(seq_len, NUM_SPLITS)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    qv = tl.load(
        q + b * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(req_to_token + row * stride_row + offs_n, mask=mask_n, other=0).to(tl.int64)
        m_i, l_i, acc = _attend_block(
            qv, k_cache + kv_head * stride_kh, v_cache + kv_head * stride_vh, slots,
            mask_n, mask_n[None, :], offs_d, mask_d, stride_ks, stride_vs, scale,
            m_i, l_i, acc, IEEE,
        )  # fmt: skip
    has_keys = end > start
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(has_keys, m_i + tl.log(safe_l), float("-inf"))
    base = b * stride_pb + heads * stride_ph + split * stride_ps
    tl.store(
        part_out + base[:, None] + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :]
    )
    tl.store(part_lse + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


@triton.jit
def _decode_reduce_kernel(
    part_out, part_lse, o, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_on,
    stride_oh, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """One program per (request, query head): merges the splits by their log-sum-exp."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, DIM_PAD)
    lse = tl.load(part_lse + b * stride_lb + h * stride_lh + offs_s)
    m = tl.max(lse, 0)
    w = tl.exp(lse - m)
    w = w / tl.sum(w, 0)
    parts = tl.load(
        part_out + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :]
    )
    out = tl.sum(parts * w[:, None], 0)
    tl.store(
        o + b * stride_on + h * stride_oh + offs_d,
        out.to(o.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@triton.jit
def _extend_kernel(
    q, k_cache, v_cache, o, req_to_token, req_pool_idx, prefix_lens, extend_lens, extend_start,
    stride_qn, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_on, stride_oh,
    stride_row, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, LENGTH_CLASS,
):  # fmt: skip
    """One program per (request, query head, block of new tokens): causal attention over the
    request's cached prefix and its new tokens, all read from the pool."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_head = h // GROUP
    row = tl.load(req_pool_idx + b).to(tl.int64)
    prefix = tl.load(prefix_lens + b)
    n_new = tl.load(extend_lens + b)
    first = tl.load(extend_start + b).to(tl.int64)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DIM_PAD)
    mask_m = offs_m < n_new
    mask_d = offs_d < HEAD_DIM
    q_rows = first + offs_m
    qv = tl.load(
        q + q_rows[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = prefix + offs_m
    # keys up to the last query of this block (causal); an empty block runs no iteration
    kv_end = tl.minimum(prefix + (m_block + 1) * BLOCK_M, prefix + n_new)
    kv_end = tl.where(m_block * BLOCK_M < n_new, kv_end, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        slots = tl.load(req_to_token + row * stride_row + offs_n, mask=mask_n, other=0).to(tl.int64)
        visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _attend_block(
            qv, k_cache + kv_head * stride_kh, v_cache + kv_head * stride_vh, slots,
            mask_n, visible, offs_d, mask_d, stride_ks, stride_vs, scale,
            m_i, l_i, acc, IEEE,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        o + q_rows[:, None] * stride_on + h * stride_oh + offs_d[None, :],
        out.to(o.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(n))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    scale: float,
) -> None:
    """q, out: (B, H, D); scratch from `decode_scratch` with at least B rows; its split count S
    (a power of two) is the number of programs that share one request's keys."""
    B, H, D = q.shape
    hkv = k_cache.shape[1]
    group = H // hkv
    splits = part_out.shape[2]
    dim_pad = part_out.shape[3]
    ieee = q.dtype == torch.float32
    _decode_split_kernel[(B, hkv, splits)](
        q, k_cache, v_cache, req_to_token, req_pool_idx, seq_lens, part_out, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), req_to_token.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0),
        part_lse.stride(1), scale, GROUP=group, GROUP_PAD=_pow2(group), HEAD_DIM=D, DIM_PAD=dim_pad,
        NUM_SPLITS=splits, BLOCK_N=64 if D <= 128 else 32, IEEE=ieee,
    )  # fmt: skip
    _decode_reduce_kernel[(B, H)](
        part_out, part_lse, out, part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1), HEAD_DIM=D, DIM_PAD=dim_pad, NUM_SPLITS=splits,
    )  # fmt: skip


def decode_scratch(
    max_batch: int, heads: int, head_dim: int, splits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (request, query head, split): the partial output (B, H, S, DIM_PAD) and its log-sum-exp
    (B, H, S), both fp32."""
    dim_pad = _pow2(head_dim)
    part_out = torch.empty(max_batch, heads, splits, dim_pad, dtype=torch.float32, device=device)
    part_lse = torch.empty(max_batch, heads, splits, dtype=torch.float32, device=device)
    return part_out, part_lse


def _extend_configs() -> list:
    """Tile shapes tried once per (group, head dim, length class) on a GPU: prefill is bound by
    the matrix units, where the tile shape decides the rate. The length class is a plain argument,
    so a new class re-tunes without compiling anything new."""
    shapes = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2), (16, 64, 4, 2)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
        for m, n, w, st in shapes
    ]


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_extend_tuned = (
    None
    if _INTERPRETED
    else triton.autotune(_extend_configs(), key=["GROUP", "HEAD_DIM", "LENGTH_CLASS", "IEEE"])(
        _extend_kernel
    )
)


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_idx: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start: torch.Tensor,
    max_extend_len: int,
    scale: float,
) -> None:
    """q, out: (N, H, D) for the new tokens of every request."""
    _, H, D = q.shape
    hkv = k_cache.shape[1]
    args = (
        q, k_cache, v_cache, out, req_to_token, req_pool_idx, prefix_lens, extend_lens,
        extend_start, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        req_to_token.stride(0), scale,
    )  # fmt: skip
    consts = dict(
        GROUP=H // hkv, HEAD_DIM=D, DIM_PAD=_pow2(D), IEEE=q.dtype == torch.float32,
        LENGTH_CLASS=0 if max_extend_len <= 16 else 1 if max_extend_len <= 128 else 2,
    )  # fmt: skip
    b = req_pool_idx.shape[0]
    if _extend_tuned is None:  # the interpreter: one fixed tile
        block_m = 64 if max_extend_len > 32 else 16
        grid = (b, H, triton.cdiv(max_extend_len, block_m))
        _extend_kernel[grid](*args, **consts, BLOCK_M=block_m, BLOCK_N=32)
        return
    grid = lambda meta: (b, H, triton.cdiv(max_extend_len, meta["BLOCK_M"]))  # noqa: E731
    _extend_tuned[grid](*args, **consts)
