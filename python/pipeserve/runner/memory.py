"""What a CUDA rank keeps out of its KV budget: activations of the largest eager microbatch,
the sampler's per-row vocabulary temporaries, the CUDA graphs' buffers, and in deterministic mode
the decode attention's per-split partials."""

from __future__ import annotations

import torch

from pipeserve.config import EngineConfig
from pipeserve.model.config import ModelConfig
from pipeserve.model.parallel import ParallelContext

SLACK_BYTES = 1 << 30  # allocator fragmentation, NCCL and Triton workspaces


def reserved_bytes(
    cfg: EngineConfig, model: ModelConfig, ctx: ParallelContext, dtype: torch.dtype
) -> int:
    width = torch.tensor([], dtype=dtype).element_size()
    tp = ctx.tp_size
    qkv = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim // tp
    # live tensors of one layer per token: hidden and residual (and their fp32 norm), q/k/v,
    # attention output, gate-up and the activated product; fp32 where normalised
    per_token = (
        6 * model.hidden_size * 4 + 2 * qkv * width + 3 * model.intermediate_size // tp * width
    )
    activations = cfg.chunked_prefill_size * per_token
    sampler = 0
    if ctx.is_last_stage:
        # logits (fp32), their filtered and float64 noisy copies, a sort: ~32 bytes per entry
        sampler = cfg.micro_batch_cap * model.vocab_size * 32
    graphs = 0 if cfg.disable_cuda_graph else cfg.cuda_graph_max_bs * per_token
    rings = 0  # later stages' preallocated proxy receive buffers (pp_loop.ReceiveRings)
    if not ctx.is_first_stage:
        rings = (
            (cfg.num_microbatches + 2) * cfg.chunked_prefill_size * model.hidden_size * 2 * width
        )
    return activations + sampler + graphs + rings + _invariant_scratch(cfg, model, tp) + SLACK_BYTES


def _invariant_scratch(cfg: EngineConfig, model: ModelConfig, tp: int) -> int:
    """Deterministic mode's decode partials: fp32 output and log-sum-exp per request, query head
    and key split of the longest context (`attention/triton_invariant.py`)."""
    if not cfg.deterministic:
        return 0
    from pipeserve.model.attention.invariant_kernels import SPLIT_TOKENS

    context = cfg.context_length or model.max_position_embeddings
    splits = -(-(context + 1) // SPLIT_TOKENS)
    dim_pad = max(16, 1 << (model.head_dim - 1).bit_length())
    return (cfg.micro_batch_cap + 1) * model.num_heads // tp * splits * (dim_pad + 1) * 4
