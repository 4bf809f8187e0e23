"""Batch-invariant paged attention in Triton (deterministic mode): a query's output depends on its
position and its keys alone, never on its batch, on whether it decodes or extends, or on how its
prompt was chunked.

The schedule, for a query at position p:
- its keys 0..p are cut into splits of SPLIT_TOKENS positions from 0 (a fixed size in tokens, not
  a fixed number of splits), each split into BLOCK_N-key blocks from its start;
- a split's blocks run one online softmax from scratch; the split leaves its normalised output
  and log-sum-exp;
- the splits are merged in order, split 0 first (`_merge`).
Query rows are (token, query head) pairs of one KV head, BLOCK_M to a tile, in both kernels: a
decode's tile holds one token's heads of the group (the rest padding rows), an extend's tile
holds consecutive tokens' heads. Both reach each row's scores through the same MMA tile shape.

Decode spreads the splits over programs (`_decode_kernel`, split-K for parallelism); each stores
its splits' partials, and the last of a (request, row tile)'s programs to arrive (an atomic count)
merges them in order from memory. Extend runs a row tile's splits one after the other in one
program and merges as it goes. The two share `_split_partial` and `_merge`, and
every kernel is compiled without FMA contraction (`enable_fp_fusion=False`), so the compiler
cannot round the same expression differently in the two. Blocks past a row's position (the
causal future inside an extend tile) and splits past it change nothing: their keys' weights are
exact zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pipeserve.model.attention.triton_kernels import _attend_block
from pipeserve.model.pdl import pdl_start

SPLIT_TOKENS = 256  # key positions per split
BLOCK_M = 16  # query rows per tile: (token, head) pairs
BLOCK_N = 64  # keys per block
NUM_WARPS = 4  # both kernels: a row's sums over a block follow the layout, which follows this
GRID_SPLITS = 16  # decode programs per (request, KV head, tile) along the splits, at most
BUSY_PROGRAMS = 2048  # decode programs that fill a GPU: a batch with as many (request, KV head,
# tile)s gets MIN_GRID_SPLITS programs along the splits, each running its splits in turn
MIN_GRID_SPLITS = 4  # so that a long request among many short ones still spreads its splits
# (the programs past a request's last split return at once)


@triton.jit
def _split_partial(qv, k_head, v_head, table_row, start, end, q_pos, offs_d, mask_d, stride_ks, stride_vs, scale, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIM_PAD: tl.constexpr):  # fmt: skip
    """The rows' attention over keys [start, end) of one split (key j visible to a row when
    j <= its q_pos): (normalised output (BLOCK_M, DIM_PAD), log-sum-exp (BLOCK_M,))."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(table_row + offs_n, mask=mask_n, other=0).to(tl.int64)
        visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _attend_block(
            qv, k_head, v_head, slots, mask_n, visible, offs_d, mask_d, stride_ks, stride_vs,
            scale, m_i, l_i, acc, IEEE,
        )  # fmt: skip
    seen = l_i > 0
    safe_l = tl.where(seen, l_i, 1.0)
    return acc / safe_l[:, None], tl.where(seen, m_i + tl.log(safe_l), float("-inf"))


@triton.jit
def _merge(m, w, o, lse, part):
    """Running (largest log-sum-exp, weight sum, weighted output sum) with one more split."""
    m_new = tl.maximum(m, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    old = tl.exp(m - m_safe)
    new = tl.exp(lse - m_safe)
    return m_new, w * old + new, o * old[:, None] + part * new[:, None]


@triton.jit
def _group_rows(tile, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """A tile's rows: (token offset, head within the group) of each."""
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    return r // GROUP, r % GROUP


@triton.jit
def _decode_kernel(
    q, k_cache, v_cache, o, req_to_token, req_pool_idx, seq_lens, part_out, part_lse, counters,
    stride_qn, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_on, stride_oh,
    stride_row, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_cb, scale,
    GROUP: tl.constexpr, TILES: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Program (request, KV head x row tile, p) of P along the splits: of a request with S splits,
    the first min(P, S) programs take splits p, p + P, p + 2P, ... for the tile's query heads and
    store each split's output and log-sum-exp; the last of them to arrive merges every split in
    order, split 0 first, and stores the output (a lone program skips the count). The others
    return at once. Every request has at least one key (a pad request attends its own slot)."""
    pdl_start(PDL)
    b = tl.program_id(0)
    seq_len = tl.load(seq_lens + b)
    n_splits = tl.cdiv(seq_len, SPLIT)
    programs = tl.minimum(tl.num_programs(2), n_splits)
    if tl.program_id(2) < programs:
        kv_head = tl.program_id(1) // TILES
        token, g = _group_rows(tl.program_id(1) % TILES, GROUP, BLOCK_M)
        rows_ok = token == 0
        heads = kv_head * GROUP + g
        offs_d = tl.arange(0, DIM_PAD)
        mask_d = offs_d < HEAD_DIM
        row_mask = rows_ok[:, None] & mask_d[None, :]
        qv = tl.load(q + b * stride_qn + heads[:, None] * stride_qh + offs_d[None, :], mask=row_mask, other=0.0)  # fmt: skip
        q_pos = tl.zeros([BLOCK_M], tl.int32) + seq_len - 1
        table_row = req_to_token + tl.load(req_pool_idx + b).to(tl.int64) * stride_row
        parts = part_out + b * stride_pb + heads[:, None] * stride_ph + offs_d[None, :]
        lses = part_lse + b * stride_lb + heads * stride_lh
        for s in range(tl.program_id(2), n_splits, tl.num_programs(2)):
            start = s * SPLIT
            end = tl.minimum(start + SPLIT, seq_len)
            part, lse = _split_partial(
                qv, k_cache + kv_head * stride_kh, v_cache + kv_head * stride_vh, table_row,
                start, end, q_pos, offs_d, mask_d, stride_ks, stride_vs, scale, IEEE, BLOCK_M,
                BLOCK_N, DIM_PAD,
            )  # fmt: skip
            tl.store(parts + s * stride_ps, part, mask=row_mask)
            tl.store(lses + s, lse, mask=rows_ok)
        # every thread's partials are stored before the count says so, and before any thread
        # merges them (each log-sum-exp is stored by one thread and read by all)
        tl.debug_barrier()
        last = programs == 1
        if programs > 1:
            counter = counters + b * stride_cb + tl.program_id(1)
            last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == programs - 1
            if last:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        if last:
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            w = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
            for s in range(0, n_splits):
                part = tl.load(parts + s * stride_ps, mask=row_mask, other=0.0, cache_modifier=".cg")  # fmt: skip
                lse = tl.load(lses + s, mask=rows_ok, other=0.0, cache_modifier=".cg")
                m, w, acc = _merge(m, w, acc, lse, part)
            out = acc / tl.where(rows_ok, w, 1.0)[:, None]
            at = o + b * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(at, out.to(o.dtype.element_ty), mask=row_mask)


@triton.jit
def _extend_kernel(
    q, k_cache, v_cache, o, req_to_token, req_pool_idx, prefix_lens, extend_lens, extend_start,
    stride_qn, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_on, stride_oh,
    stride_row, scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Program (request, KV head, row tile): the tile's rows over their keys, split by split,
    merged as they come."""
    pdl_start(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    token, g = _group_rows(tl.program_id(2), GROUP, BLOCK_M)
    prefix = tl.load(prefix_lens + b)
    n_new = tl.load(extend_lens + b)
    rows_ok = token < n_new
    heads = kv_head * GROUP + g
    q_rows = tl.load(extend_start + b).to(tl.int64) + token
    offs_d = tl.arange(0, DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    row_mask = rows_ok[:, None] & mask_d[None, :]
    qv = tl.load(q + q_rows[:, None] * stride_qn + heads[:, None] * stride_qh + offs_d[None, :], mask=row_mask, other=0.0)  # fmt: skip
    q_pos = prefix + token
    last = tl.minimum((tl.program_id(2) * BLOCK_M + BLOCK_M - 1) // GROUP, n_new - 1)
    tile_end = tl.where(tl.program_id(2) * BLOCK_M < n_new * GROUP, prefix + last + 1, 0)
    table_row = req_to_token + tl.load(req_pool_idx + b).to(tl.int64) * stride_row
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    for s in range(0, tl.cdiv(tile_end, SPLIT)):
        start = s * SPLIT
        part, lse = _split_partial(
            qv, k_cache + kv_head * stride_kh, v_cache + kv_head * stride_vh, table_row, start,
            tl.minimum(start + SPLIT, tile_end), q_pos, offs_d, mask_d, stride_ks, stride_vs,
            scale, IEEE, BLOCK_M, BLOCK_N, DIM_PAD,
        )  # fmt: skip
        m, w, acc = _merge(m, w, acc, lse, part)
    out = acc / tl.where(rows_ok, w, 1.0)[:, None]
    at = o + q_rows[:, None] * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(at, out.to(o.dtype.element_ty), mask=row_mask)
