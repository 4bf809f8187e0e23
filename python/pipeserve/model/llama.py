"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3), one pipeline stage's share of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeserve.model.attention import AttentionBackend
from pipeserve.model.config import ModelConfig
from pipeserve.model.forward_batch import ForwardBatch
from pipeserve.model.fused import rotate_, rotate_store_kv_, store_kv
from pipeserve.model.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pipeserve.model.rotary import RotaryEmbedding
from pipeserve.model.vision import VisionTower


@dataclass(frozen=True)
class ArchSpec:
    """What sets a family apart. None: take the config's `attention_bias`."""

    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False
    vision: str = ""  # a vision-language model's tower: "qwen2_5" or "qwen3"; "" for text only


@dataclass
class VisualRows:
    """A microbatch's image tokens, for the layers: their rows in the batch, and on stage 0 their
    embeddings (which replace the image-pad embeddings); DeepStack features (k, M, H) on every
    stage that holds one of the first k layers (they are added to those layers' outputs)."""

    rows: torch.Tensor  # (M,) int64
    embeds: torch.Tensor | None = None  # (M, H)
    deepstack: torch.Tensor | None = None  # (k, M, H)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, spec: ArchSpec) -> None:
        super().__init__()
        D = cfg.head_dim
        self.heads = ctx.shard(cfg.num_heads, "num_attention_heads")
        self.kv_heads = ctx.shard(cfg.num_kv_heads, "num_key_value_heads")
        self.head_dim = D
        self.scale = D**-0.5
        qkv_bias = cfg.attention_bias if spec.qkv_bias is None else spec.qkv_bias
        o_bias = cfg.attention_bias if spec.o_bias is None else spec.o_bias
        sizes = [cfg.num_heads * D, cfg.num_kv_heads * D, cfg.num_kv_heads * D]
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, sizes, qkv_bias, ctx, "qkv_proj")
        self.o_proj = RowParallelLinear(cfg.num_heads * D, cfg.hidden_size, o_bias, ctx, "o_proj")
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps) if spec.qk_norm else None
        # PDL (`model/pdl.py`) in deterministic mode, whose layers are Triton kernels throughout
        self.pdl = ctx.batch_invariant

    def forward(
        self,
        qkv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        kv: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Attention of the projected q | k | v (N, (H + 2 Hkv) D), then o_proj."""
        n, D, H, Hkv = qkv.shape[0], self.head_dim, self.heads, self.kv_heads
        v = qkv[:, (H + Hkv) * D :].view(n, Hkv, D)
        if self.q_norm is None:  # q and k rotated in place and k, v stored: one kernel
            rotate_store_kv_(qkv, H, Hkv, *rope, *kv, batch.out_slots, pdl=self.pdl)
            q = qkv[:, : H * D].view(n, H, D)
            k = qkv[:, H * D : (H + Hkv) * D].view(n, Hkv, D)
        else:
            q = rotate_(self.q_norm(qkv[:, : H * D].view(n, H, D)), *rope)
            k = rotate_(self.k_norm(qkv[:, H * D : (H + Hkv) * D].view(n, Hkv, D)), *rope)
            store_kv(k, v, *kv, batch.out_slots)
        out = backend.forward(q, k, v, kv, batch, self.scale)
        return self.o_proj(out.reshape(n, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.inter_local = ctx.shard(inter, "intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [inter, inter], cfg.mlp_bias, ctx, "gate_up_proj"
        )
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, ctx, "down_proj")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """down(silu(gate) * up) of the hidden from `gate_up_proj.norm_gate_up_forward`."""
        return self.down_proj.down_forward(hidden, self.inter_local)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, spec: ArchSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ctx, spec)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, ctx)

    def forward(self, hidden, residual, rope, batch, kv, backend):
        """(hidden, residual) -> (mlp output, residual); the residual add is fused into the next norm."""
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = attn.qkv_proj.norm_forward(self.input_layernorm, hidden, residual)
        hidden = attn(qkv, rope, batch, kv, backend)
        hidden, residual = mlp.gate_up_proj.norm_gate_up_forward(
            self.post_attention_layernorm, hidden, residual, mlp.inter_local
        )
        return mlp(hidden), residual


# HF parameter name -> (our name, shard index) for the projections that are merged here.
_MERGED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class DecoderForCausalLM(nn.Module):
    """Layers [start, end) of the model; embedding on the first stage, norm and lm_head on the last."""

    def __init__(
        self,
        cfg: ModelConfig,
        ctx: ParallelContext,
        spec: ArchSpec,
        layers: tuple[int, int],
        device: torch.device,
    ) -> None:
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.start, self.end = layers
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx)
            if ctx.is_first_stage
            else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, ctx, spec) for _ in range(self.start, self.end)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if ctx.is_last_stage else None
        self.lm_head = (
            ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx) if ctx.is_last_stage else None
        )
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, device)
        self.visual = None
        if spec.vision and ctx.is_first_stage:
            self.visual = VisionTower(cfg.vision, spec.vision == "qwen3", device)
        self.num_deepstack = (
            len(cfg.vision.get("deepstack_visual_indexes") or []) if spec.vision == "qwen3" else 0
        )

    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        visual: VisualRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs this stage's layers. The first stage embeds `input_ids` (image tokens: their
        `visual` embeddings); later stages continue from the previous stage's (hidden, residual).
        Returns (hidden, residual), not yet added."""
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(input_ids), None
            if visual is not None:
                hidden[visual.rows] = visual.embeds.to(hidden.dtype)
        if batch.mrope_positions is not None:  # a multimodal prefill: three positions a token
            rope = self.rotary.cos_sin_3d(batch.mrope_positions, hidden.dtype)
        else:
            rope = self.rotary.cos_sin(batch.rope_positions, hidden.dtype)
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches, strict=True)):
            hidden, residual = layer(hidden, residual, rope, batch, kv, backend)
            if visual is not None and self.start + i < self.num_deepstack:
                # DeepStack: added to the layer's output (the residual add follows in the next norm)
                hidden.index_add_(0, visual.rows, visual.deepstack[self.start + i].to(hidden.dtype))
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the rows given (the last stage's sampled rows): (B, V) fp32."""
        return self.lm_head(self.norm.add_norm(hidden, residual)[0]).float()

    def checkpoint_name(self, name: str, shard: int) -> str:
        """The Hugging Face name of shard `shard` of this stage's parameter `name`."""
        parts = name.split(".")
        if parts[0] == "visual":
            return name
        if parts[0] == "layers":
            parts[1] = str(int(parts[1]) + self.start)
            merged = [hf for hf, (ours, i) in _MERGED.items() if ours == parts[-2] and i == shard]
            parts[-2] = merged[0] if merged else parts[-2]
        return ("" if parts[0] == "lm_head" else "model.") + ".".join(parts)

    def weight_targets(self, name: str) -> list[tuple[nn.Module, str, int]]:
        """Where a checkpoint tensor goes on this stage: (module, parameter, shard); [] to skip."""
        # Qwen-VL checkpoints: `visual.*` or `model.visual.*`; the language model's tensors under
        # `model.*` or `model.language_model.*`
        name = name.replace("model.language_model.", "model.", 1).replace(
            "model.visual.", "visual."
        )
        if name.startswith("visual."):
            return [] if self.visual is None else self.visual.weight_target(name[len("visual.") :])
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "embed_tokens":
            targets = [(self.embed_tokens, "weight", 0)] if self.embed_tokens is not None else []
            if self.lm_head is not None and self.cfg.tie_word_embeddings:
                targets.append((self.lm_head, "weight", 0))
            return targets
        if parts[0] == "lm_head":
            return [(self.lm_head, "weight", 0)] if self.lm_head is not None else []
        if parts[0] == "norm":
            return [(self.norm, parts[1], 0)] if self.norm is not None else []
        if parts[0] != "layers" or not self.start <= int(parts[1]) < self.end:
            return []
        module: Any = self.layers[int(parts[1]) - self.start]
        *path, leaf, param = parts[2:]
        for p in path:
            module = getattr(module, p)
        leaf, shard = _MERGED.get(leaf, (leaf, 0))
        target = getattr(module, leaf, None)
        return (
            [(target, param, shard)] if isinstance(target, nn.Module) else []
        )  # e.g. rotary_emb.inv_freq
