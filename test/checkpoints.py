"""Tiny random Hugging Face checkpoints that the tests create through `transformers`."""

from __future__ import annotations

import inspect
import os

import torch

from pipeserve.utils import write_char_tokenizer

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_checkpoint(
    path: str,
    arch: str = "llama",
    layers: int = 3,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    tied: bool = False,
    seed: int = 0,
    init_std: float = 0.1,
    **extra: object,
) -> str:
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_char_tokenizer(path, vocab)
    return path


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations by the `transformers` model itself, one prompt at a time with its KV
    cache (no padding effects); exactly `max_new_tokens` each, EOS included, as ignore_eos does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cache = _cache_name(model)
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            new: list[int] = []
            while True:
                new.append(int(out.logits[0, -1].argmax()))
                if len(new) == max_new_tokens:
                    break
                past = {cache: getattr(out, cache)}
                out = model(torch.tensor([[new[-1]]]), use_cache=True, **past)
            outs.append(new)
    return outs


def _cache_name(model: object) -> str:
    """The KV cache's name, as argument and output: `cache` in transformers 5 (which deprecates
    `past_key_values`, to be removed in 5.40), `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
