"""The numbers of a Hugging Face decoder checkpoint, read from its config.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeserve.env import PP_LAYER_PARTITION, Env

if TYPE_CHECKING:
    import torch

# torch is imported only where a torch.dtype is asked for: the launcher checks a model and its
# layer split without it (the import takes seconds, and the ranks pay it anyway)
_DTYPES = ("float32", "bfloat16", "float16")
_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}


def dtype_name(name: str | torch.dtype) -> str:
    """The supported dtype `name` (a torch.dtype, "torch.bfloat16", "bf16", ...) stands for."""
    key = str(name).removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return key


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    return getattr(torch, dtype_name(name))


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # multimodal rotary (Qwen-VL): frequencies per position axis (t, h, w), in blocks or interleaved
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope: RopeConfig
    dtype: str  # config.json's torch_dtype (or dtype), as `dtype_name` spells it
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    # a vision-language model's vision tower (its config.json `vision_config`) and image token
    vision: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    image_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dir(cls, model_path: str) -> ModelConfig:
        path = os.path.join(model_path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{model_path!r} is not a Hugging Face model directory: no config.json"
            )
        with open(path) as f:
            raw = json.load(f)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError(
                "config.json names no `architectures`; cannot tell which model to build"
            )
        top = raw
        # a vision-language checkpoint keeps its language model's numbers in `text_config`
        raw = {**raw, **raw.get("text_config", {})}
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        eos = top.get("eos_token_id", raw.get("eos_token_id"))
        return cls(
            architecture=archs[0],
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope=_rope(raw),
            dtype=dtype_name(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            hidden_act=raw.get("hidden_act", "silu"),
            vision=top.get("vision_config"),
            image_token_id=top.get("image_token_id"),
            raw=raw,
        )


def _rope(raw: dict[str, Any]) -> RopeConfig:
    """Reads both the classic (`rope_theta` + `rope_scaling`) and the newer `rope_parameters` form."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    kind = "default" if kind == "mrope" else kind  # older Qwen-VL configs: the section alone
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(
            f"rope type {kind!r} is not supported (supported: default, linear, llama3)"
        )
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        mrope_section=tuple(int(x) for x in params.get("mrope_section") or ()),
        # Qwen3-VL interleaves the axes (its transformers code always does), Qwen2.5-VL does not
        mrope_interleaved=bool(
            params.get("mrope_interleaved", raw.get("model_type", "").startswith("qwen3_vl"))
        ),
    )


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
