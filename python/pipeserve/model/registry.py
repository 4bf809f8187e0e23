"""Model registry keyed by the checkpoint's `architectures`, and stage construction."""

from __future__ import annotations

import torch

from pipeserve.model.config import ModelConfig, stage_layers
from pipeserve.model.llama import ArchSpec, DecoderForCausalLM
from pipeserve.model.parallel import ParallelContext

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(),
    "Qwen2ForCausalLM": ArchSpec(qkv_bias=True, o_bias=False),
    "Qwen3ForCausalLM": ArchSpec(qk_norm=True),
    "Qwen2_5_VLForConditionalGeneration": ArchSpec(qkv_bias=True, o_bias=False, vision="qwen2_5"),
    "Qwen3VLForConditionalGeneration": ArchSpec(qk_norm=True, vision="qwen3"),
}


def arch_spec(architecture: str) -> ArchSpec:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[architecture]


def build_stage_model(
    cfg: ModelConfig,
    ctx: ParallelContext,
    dtype: torch.dtype,
    device: torch.device,
    partition: str | None = None,
) -> DecoderForCausalLM:
    """This rank's share of the model, parameters uninitialised (the loader fills them)."""
    spec = arch_spec(cfg.architecture)
    layers = stage_layers(cfg, ctx.pp_size, partition)[ctx.pp_rank]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DecoderForCausalLM(cfg, ctx, spec, layers, device)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
