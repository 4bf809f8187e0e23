"""The `triton` backend: paged decode (split over the keys, merged by log-sum-exp) and extend
kernels reading K/V through req_to_token; decode batches run inside CUDA graphs."""

from __future__ import annotations

import torch

from pipeserve.model.attention import triton_kernels as kernels
from pipeserve.model.attention.base import AttentionBackend, BackendSpec, register
from pipeserve.model.forward_batch import ForwardBatch

MAX_SPLITS = 16


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Key splits per decode request: enough programs to cover the device twice over, a power of
    two, 1 once the batch alone does. A function of the batch size only, so that a graph captured
    for a bucket and an eager run of the same size agree."""
    if device.type != "cuda":
        return 2
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1
    while splits < MAX_SPLITS and batch * kv_heads * splits * 2 <= programs:
        splits *= 2
    return splits


@register("triton")
class TritonBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, spec: BackendSpec, req_to_token: torch.Tensor) -> None:
        super().__init__(spec, req_to_token)
        rows = max(
            b * num_splits(b, spec.kv_heads, spec.device) for b in range(1, spec.max_batch + 2)
        )
        # one flat scratch, viewed per batch as (B, H, S, DIM_PAD) and (B, H, S)
        part_out, part_lse = kernels.decode_scratch(rows, spec.heads, spec.head_dim, 1, spec.device)
        self.part_out_flat, self.part_lse_flat = part_out.view(-1), part_lse.view(-1)
        self.dim_pad = part_out.shape[-1]

    def prepare_metadata(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            batch.attn = self._scratch(batch.num_reqs)

    def _scratch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, h = num_splits(b, self.spec.kv_heads, self.spec.device), self.spec.heads
        out = self.part_out_flat[: b * h * s * self.dim_pad].view(b, h, s, self.dim_pad)
        return out, self.part_lse_flat[: b * h * s].view(b, h, s)

    def forward(self, q, k, v, kv, batch, scale):
        k_cache, v_cache = kv
        out = torch.empty_like(q)
        if batch.is_decode:
            part_out, part_lse = batch.attn
            kernels.decode_attention(
                q, k_cache, v_cache, out, self.req_to_token, batch.req_pool_idx,
                batch.seq_lens, part_out, part_lse, scale,
            )  # fmt: skip
        else:
            kernels.extend_attention(
                q, k_cache, v_cache, out, self.req_to_token, batch.req_pool_idx,
                batch.prefix_lens, batch.extend_lens, batch.extend_start,
                batch.max_extend_len, scale,
            )  # fmt: skip
        return out

    def init_capture(self, max_batch: int) -> None:
        pass  # the scratch above already covers every batch size up to max_batch

    def prepare_capture(self, batch: ForwardBatch) -> None:
        self.prepare_metadata(batch)

    def prepare_replay(self, batch: ForwardBatch) -> None:
        pass  # the kernels read lengths and rows from the static buffers themselves
