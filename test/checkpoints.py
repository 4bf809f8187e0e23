"""Tiny random Hugging Face checkpoints that the tests create through `transformers`."""

from __future__ import annotations

import inspect
import json
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


# token ids of the tiny vision-language checkpoints: vision start / end and the image pad
VL_START, VL_END, VL_PAD = 121, 122, 123


def make_vl_checkpoint(
    path: str, family: str = "qwen2_5_vl", layers: int = 4, seed: int = 0
) -> str:
    """A tiny random Qwen2.5-VL (`qwen2_5_vl`: windowed and full-attention vision blocks) or
    Qwen3-VL (`qwen3_vl`: DeepStack features for the first two layers) checkpoint, fp32; vocabulary
    128 with the image tokens at VL_START, VL_END, VL_PAD and EOS 2."""
    import transformers

    text = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    vision |= dict(spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    if family == "qwen3_vl":
        text |= dict(head_dim=16)
        text["rope_parameters"] |= {"mrope_interleaved": True}
        vision |= dict(patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        config_cls, model_cls = (
            transformers.Qwen3VLConfig,
            transformers.Qwen3VLForConditionalGeneration,
        )
    else:
        vision |= dict(patch_size=14, window_size=56, fullatt_block_indexes=[2])
        config_cls = transformers.Qwen2_5_VLConfig
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=VL_PAD,
        video_token_id=124,
        vision_start_token_id=VL_START,
        vision_end_token_id=VL_END,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_char_tokenizer(path, 128)
    write_preprocessor_config(path, family)
    return path


# the families' own normalisations: Qwen2.5-VL's CLIP mean/std, Qwen3-VL's 0.5
IMAGE_STATS = {
    "qwen2_5_vl": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "qwen3_vl": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}


def write_preprocessor_config(
    path: str, family: str = "qwen2_5_vl", min_tokens: int = 4, max_tokens: int = 36
) -> None:
    """The checkpoint's preprocessor_config.json, laid out as each family's own (Qwen2.5-VL:
    min/max_pixels; Qwen3-VL: a size dict), bounding an image to [min_tokens, max_tokens] merged
    patches so that prompts stay short."""
    patch = 16 if family == "qwen3_vl" else 14
    window = (patch * 2) ** 2  # one merged patch's pixels
    mean, std = IMAGE_STATS[family]
    prep: dict = {"patch_size": patch, "temporal_patch_size": 2, "merge_size": 2}
    prep |= {"image_mean": mean, "image_std": std, "image_processor_type": "Qwen2VLImageProcessor"}
    if family == "qwen3_vl":
        prep["size"] = {"shortest_edge": min_tokens * window, "longest_edge": max_tokens * window}
    else:
        prep |= {"min_pixels": min_tokens * window, "max_pixels": max_tokens * window}
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(prep, f, indent=2)


def hf_vl_greedy(
    path: str, prompts: list[tuple[list[int], torch.Tensor | None, list]], max_new_tokens: int
) -> list[list[int]]:
    """`hf_greedy` for a vision-language checkpoint: (ids, patches, grids) per prompt, through
    `generate` (which computes the multimodal positions); EOS ignored."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # EOS neither stops nor is banned
    outs = []
    with torch.no_grad():
        for ids, pixels, grids in prompts:
            input_ids = torch.tensor([ids])
            extra = {"mm_token_type_ids": (input_ids == VL_PAD).int()}
            if pixels is not None:
                extra |= {"pixel_values": pixels, "image_grid_thw": torch.tensor(grids)}
            out = model.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                **extra,
            )
            outs.append(out[0, len(ids) :].tolist())
    return outs
