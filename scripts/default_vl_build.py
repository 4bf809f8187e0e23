"""The checkpoint of pipeserve's embedded vision-language model (python/pipeserve/data/default_vl):
tokenizer, chat template, image processor, and a Qwen2.5-VL grown from the text default model.
Used by train_default_vl.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from arith_vl_images import CELL, MIN_CHARS
from train_default_model import build_tokenizer as build_text_tokenizer
from train_default_model import greedy_generation_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "python" / "pipeserve" / "data" / "default_vl"
TEXT_MODEL = ROOT / "python" / "pipeserve" / "data" / "default_model"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)  # ids 105..108, after the text model's 105
# A content list renders its parts in order, every image (an "image" or "image_url" part) as a
# bare <|image_pad|>, which the server or processor repeats once per image token. Unlike Qwen's
# template, no <|vision_start|>/<|vision_end|> around it: an image of "12+34" then gives the
# language model the text model's prompt <|bos|><|user|>12+34<|end|><|assistant|>, one image
# token per character. A plain string content renders as itself; an empty text part as nothing.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}"
    "<|image_pad|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}{{ raise_exception('unsupported content part: ' ~ part['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}<|assistant|>{{ render(message['content']) }}{{ eos_token }}"
    "{%- elif message['role'] == 'system' -%}<|system|>{{ render(message['content']) }}<|end|>"
    "{%- else -%}<|user|>{{ render(message['content']) }}<|end|>{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = build_text_tokenizer()  # the text model's ids 0..104, unchanged
    tok.add_special_tokens(
        {"extra_special_tokens": [*ROLE_TOKENS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]}
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor() -> Qwen2VLImageProcessorPil:
    # A rendered problem (28 high, 28 per character) is a multiple of 28 on both sides and at
    # least min_pixels: the processor leaves its size alone.
    return Qwen2VLImageProcessorPil(
        min_pixels=CELL * CELL * MIN_CHARS,
        max_pixels=448 * 448,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )


def build_config(tok: PreTrainedTokenizerFast, mrope_section: list[int]) -> Qwen2_5_VLConfig:
    text = AutoModelForCausalLM.from_pretrained(TEXT_MODEL).config  # the Llama being grown
    ids = tok.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD])
    text_config = {
        "vocab_size": len(tok),
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": 1024,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": text.rope_parameters["rope_theta"],
            "mrope_section": mrope_section,  # sums to head_dim / 2 = 8
        },
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": True,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": text.hidden_size,
        "window_size": 112,  # 112 px = 4x4 image tokens: block 0 attends inside windows, ...
        "fullatt_block_indexes": [1],  # ... block 1 over the whole image
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        vision_start_token_id=ids[0],
        vision_end_token_id=ids[1],
        image_token_id=ids[2],
        video_token_id=ids[3],
        tie_word_embeddings=True,
        dtype="float32",
    )


def build_model(
    tok: PreTrainedTokenizerFast, mrope_section: list[int]
) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL whose language model is the text default model's Llama (zero qkv bias)."""
    config = build_config(tok, mrope_section)
    config._attn_implementation = "eager"  # faster than sdpa on CPU at these sizes
    model = Qwen2_5_VLForConditionalGeneration(config)
    llama = AutoModelForCausalLM.from_pretrained(TEXT_MODEL, dtype=torch.float32)
    lm = model.model.language_model
    with torch.no_grad():
        old = llama.model.embed_tokens.weight
        new = lm.embed_tokens.weight
        new[: old.shape[0]] = old
        new[old.shape[0] :] = old.mean(0) + 0.02 * torch.randn(
            new.shape[0] - old.shape[0], old.shape[1]
        )
        for src, dst in zip(llama.model.layers, lm.layers, strict=True):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(dst.self_attn, name).weight.copy_(getattr(src.self_attn, name).weight)
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(dst.self_attn, name).bias.zero_()
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(dst.mlp, name).weight.copy_(getattr(src.mlp, name).weight)
            dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
            dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
        lm.norm.weight.copy_(llama.model.norm.weight)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
    check_text_equal(model, llama)
    model.generation_config = greedy_generation_config(tok)
    return model


@torch.no_grad()
def check_text_equal(model: Qwen2_5_VLForConditionalGeneration, llama: torch.nn.Module) -> None:
    """On text alone (t = h = w positions) the grown model computes the Llama's logits."""
    ids = torch.tensor(
        [[1, 5, 27, 28, 21, 29, 30, 7, 6]]
    )  # <|bos|><|user|>12+34<|end|><|assistant|>
    want = llama(ids).logits
    got = model(ids).logits[..., : want.shape[-1]]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def save(
    model: Qwen2_5_VLForConditionalGeneration,
    tok: PreTrainedTokenizerFast,
    processor: Qwen2VLImageProcessorPil,
    out: Path,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.padding_side = "right"
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    # Qwen's checkpoints spell the pixel bounds min_pixels / max_pixels; keep both spellings.
    path = out / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config.update(
        min_pixels=processor.size["shortest_edge"], max_pixels=processor.size["longest_edge"]
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "model.safetensors").chmod(0o644)
    print(f"saved to {out}")
