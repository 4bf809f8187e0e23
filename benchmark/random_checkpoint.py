"""Llama-shaped checkpoints of random weights for the benchmarks: the shapes by name, and a writer
that draws the weights on the device and saves them straight to safetensors."""

from __future__ import annotations

import json
import os

import torch

SHAPES = {
    "cpu": dict(hidden=512, layers=8, inter=1536, heads=8, kv=4, vocab=4096),
    "1b": dict(hidden=2048, layers=16, inter=8192, heads=32, kv=8, vocab=32000),
    "8b": dict(hidden=4096, layers=32, inter=14336, heads=32, kv=8, vocab=128256),
}


def make_model(path: str, shape: dict, dtype: torch.dtype, device: str) -> str:
    """A Llama-shaped HF checkpoint of random weights, drawn on `device` and written straight to
    safetensors (seconds for 8B on a GPU; `transformers`' own init takes minutes)."""
    from safetensors.torch import save_file

    from pipeserve.utils import write_char_tokenizer

    h, inter, heads, kv, layers = (shape[k] for k in ("hidden", "inter", "heads", "kv", "layers"))
    d = h // heads
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * 0.02).to(dtype)

    tensors = {
        "model.embed_tokens.weight": rand(shape["vocab"], h),
        "lm_head.weight": rand(shape["vocab"], h),
    }
    tensors["model.norm.weight"] = torch.ones(h, dtype=dtype, device=device)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": rand(heads * d, h),
                p + "self_attn.k_proj.weight": rand(kv * d, h),
                p + "self_attn.v_proj.weight": rand(kv * d, h),
                p + "self_attn.o_proj.weight": rand(h, heads * d),
                p + "mlp.gate_proj.weight": rand(inter, h),
                p + "mlp.up_proj.weight": rand(inter, h),
                p + "mlp.down_proj.weight": rand(h, inter),
                p + "input_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            }
        )
    os.makedirs(path, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors")
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape["vocab"],
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    write_char_tokenizer(path, shape["vocab"])
    return path
