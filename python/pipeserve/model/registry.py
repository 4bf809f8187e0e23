"""Model registry keyed by the checkpoint's `architectures`, and stage construction."""

from __future__ import annotations

import torch

from pipeserve.env import PP_LAYER_PARTITION, Env
from pipeserve.model.config import ModelConfig
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


def partition_layers(
    num_layers: int, pp_size: int, override: str | None = None, head_layers: float = 0.0
) -> list[tuple[int, int]]:
    """[start, end) per stage, or `override` ("a,b,..."; also read from
    PIPESERVE_PP_LAYER_PARTITION). By default the stages get equal work: an even split (remainder
    on the last stages), then layers move off the last stage while that lowers the largest share,
    counting its lm_head as `head_layers` layers (`head_cost_in_layers`)."""
    source = PP_LAYER_PARTITION if override is None else "--pp-layer-partition (pp_layer_partition)"
    override = Env.read().pp_layer_partition if override is None else override
    if override:
        counts = _parse_partition(override, num_layers, pp_size, source)
    else:
        if num_layers < pp_size:
            raise ValueError(f"cannot split {num_layers} layers over pp_size={pp_size} stages")
        base, rem = divmod(num_layers, pp_size)
        counts = [base + (1 if i >= pp_size - rem else 0) for i in range(pp_size)]
        _balance(counts, head_layers)
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


def _balance(counts: list[int], head_layers: float) -> None:
    """Moves single layers from the costliest stage to the cheapest while that lowers the maximum
    (the last stage's cost includes its head); deterministic, ties to the lower stage index."""
    extra = [0.0] * (len(counts) - 1) + [head_layers]
    while True:
        cost = [n + e for n, e in zip(counts, extra, strict=True)]
        hi, lo = cost.index(max(cost)), cost.index(min(cost))
        if counts[hi] <= 1 or cost[lo] + 1 >= cost[hi]:
            return
        counts[hi] -= 1
        counts[lo] += 1


def head_cost_in_layers(cfg: ModelConfig) -> float:
    """The last stage's lm_head in decoder layers of work: its weights over one layer's (decode
    reads every weight once per step, and a batch's matmul work scales the same way). The
    embedding is a lookup and counts nothing."""
    d = cfg.head_dim
    attn = cfg.hidden_size * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.vocab_size * cfg.hidden_size / (attn + mlp)


def stage_layers(
    cfg: ModelConfig, pp_size: int, override: str | None = None
) -> list[tuple[int, int]]:
    """The model's layers per stage (`partition_layers` with this model's head cost)."""
    return partition_layers(cfg.num_layers, pp_size, override, head_cost_in_layers(cfg))


def _parse_partition(text: str, num_layers: int, pp_size: int, source: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{source} {text!r}: expected comma-separated integers") from None
    if len(counts) != pp_size:
        raise ValueError(f"{source} {text!r} has {len(counts)} entries; pp_size is {pp_size}")
    if any(n < 1 for n in counts):
        raise ValueError(f"{source} {text!r}: every stage needs at least one layer")
    if sum(counts) != num_layers:
        raise ValueError(
            f"{source} {text!r} sums to {sum(counts)}; the model has {num_layers} layers"
        )
    return counts


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
