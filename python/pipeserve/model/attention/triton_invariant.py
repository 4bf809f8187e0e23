"""The `triton` backend of deterministic mode: batch-invariant paged kernels
(`invariant_kernels.py`). Decode batches split each request's keys into fixed-size splits over
programs and merge them in order in the same launch (inside CUDA graphs too: the grid is fixed,
lengths are data); any batch with an extend runs every request, its decodes included, through
the extend kernel, which reduces each query exactly as the decode kernel does."""

from __future__ import annotations

import torch
import triton

from pipeserve.model.attention import invariant_kernels as kernels
from pipeserve.model.attention.base import AttentionBackend, BackendSpec, register
from pipeserve.model.forward_batch import ForwardBatch
from pipeserve.model.pdl import pdl_options


def scratch_shape(spec: BackendSpec, max_len: int) -> tuple[int, int, int, int]:
    """Decode partials: (requests, query heads, splits of the longest request, padded head dim)."""
    splits = triton.cdiv(max_len, kernels.SPLIT_TOKENS)
    return spec.max_batch + 1, spec.heads, splits, max(16, triton.next_power_of_2(spec.head_dim))


@register("triton_invariant")
class TritonInvariantBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, spec: BackendSpec, req_to_token: torch.Tensor) -> None:
        super().__init__(spec, req_to_token)
        shape = scratch_shape(spec, req_to_token.shape[1])
        self.part_out = torch.empty(shape, dtype=torch.float32, device=spec.device)
        self.part_lse = torch.empty(shape[:3], dtype=torch.float32, device=spec.device)
        # arrivals per (request, KV head x row tile) along the splits; every launch leaves them
        # at zero (one launch at a time: a rank's forward runs on one stream)
        self.counters = torch.zeros(shape[:2], dtype=torch.int32, device=spec.device)

    def prepare_metadata(self, batch: ForwardBatch) -> None:
        pass  # the kernels read rows and lengths from the batch's own tensors

    def forward(self, q, k, v, kv, batch, scale):
        out = torch.empty_like(q)
        if batch.is_decode:
            self._decode(q, *kv, out, batch, scale)
        else:
            self._extend(q, *kv, out, batch, scale)
        return out

    def _decode(self, q, k_cache, v_cache, out, batch: ForwardBatch, scale: float) -> None:
        b, heads, d = q.shape
        kv_heads = k_cache.shape[1]
        group = heads // kv_heads
        tiles = triton.cdiv(group, kernels.BLOCK_M)
        po, pl = self.part_out, self.part_lse
        consts = dict(
            GROUP=group, TILES=tiles, HEAD_DIM=d, DIM_PAD=po.shape[3], SPLIT=kernels.SPLIT_TOKENS,
        )  # fmt: skip
        # programs along the splits: fewer as the batch fills the GPU (which program runs a
        # split changes none of its bits); fixed for a captured batch size
        busy = triton.cdiv(kernels.BUSY_PROGRAMS, b * kv_heads * tiles)
        grid_splits = min(kernels.GRID_SPLITS, po.shape[2], max(kernels.MIN_GRID_SPLITS, busy))
        kernels._decode_kernel[(b, kv_heads * tiles, grid_splits)](
            q, k_cache, v_cache, out, self.req_to_token, batch.req_pool_idx, batch.seq_lens, po,
            pl, self.counters, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
            self.req_to_token.stride(0), po.stride(0), po.stride(1), po.stride(2), pl.stride(0),
            pl.stride(1), self.counters.stride(0), scale, **consts,
            IEEE=q.dtype == torch.float32, BLOCK_M=kernels.BLOCK_M, BLOCK_N=kernels.BLOCK_N,
            num_warps=kernels.NUM_WARPS, enable_fp_fusion=False, **pdl_options(q),
        )  # fmt: skip

    def _extend(self, q, k_cache, v_cache, out, batch: ForwardBatch, scale: float) -> None:
        _, heads, d = q.shape
        kv_heads = k_cache.shape[1]
        group = heads // kv_heads
        tiles = triton.cdiv(batch.max_extend_len * group, kernels.BLOCK_M)
        kernels._extend_kernel[(batch.req_pool_idx.shape[0], kv_heads, tiles)](
            q, k_cache, v_cache, out, self.req_to_token, batch.req_pool_idx, batch.prefix_lens,
            batch.extend_lens, batch.extend_start, q.stride(0), q.stride(1), k_cache.stride(0),
            k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), out.stride(0),
            out.stride(1), self.req_to_token.stride(0), scale, GROUP=group, HEAD_DIM=d,
            DIM_PAD=self.part_out.shape[3], SPLIT=kernels.SPLIT_TOKENS,
            IEEE=q.dtype == torch.float32, BLOCK_M=kernels.BLOCK_M, BLOCK_N=kernels.BLOCK_N,
            num_warps=kernels.NUM_WARPS, enable_fp_fusion=False, **pdl_options(q),
        )  # fmt: skip

    def init_capture(self, max_batch: int) -> None:
        pass  # the scratch covers every batch size up to max_batch

    def prepare_capture(self, batch: ForwardBatch) -> None:
        pass

    def prepare_replay(self, batch: ForwardBatch) -> None:
        pass  # the kernels read lengths and rows from the static buffers themselves
