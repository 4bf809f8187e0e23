"""A tiny random vision-language checkpoint that a front end can serve whole: the model and config
of `checkpoints.make_vl_checkpoint` (preprocessor_config.json included), with the embedded
model's tokenizer extended by the Qwen-VL vision tokens at VL_START, VL_END, VL_PAD and a chat
template that, like the Qwen-VL ones, takes content lists and marks each image part as
<|vision_start|><|image_pad|><|vision_end|>."""

from __future__ import annotations

import os

from checkpoints import VL_END, VL_PAD, VL_START, make_vl_checkpoint
from pipeserve.config import DEFAULT_MODEL_DIR

VISION_TOKENS = {VL_START: "<|vision_start|>", VL_END: "<|vision_end|>", VL_PAD: "<|image_pad|>"}
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% elif message['role'] == 'system' %}"
    "<|system|>{% else %}<|user|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_vl_tokenizer(path: str) -> None:
    """The embedded model's character tokenizer, filler tokens up to VL_START, then the vision
    tokens (special) at VL_START, VL_END, VL_PAD; the chat template above."""
    from transformers import AutoTokenizer

    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    tok.add_tokens([f"<|filler_{i}|>" for i in range(VL_START - len(tok))])
    tok.add_tokens([VISION_TOKENS[i] for i in sorted(VISION_TOKENS)], special_tokens=True)
    got = tok.convert_tokens_to_ids(list(VISION_TOKENS.values()))
    assert got == list(VISION_TOKENS), got
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)


def make_vl_chat_checkpoint(path: str, family: str = "qwen2_5_vl", **kwargs: object) -> str:
    """`make_vl_checkpoint(path, family, **kwargs)` with the tokenizer above: a model directory
    that `Engine` and the server load with their tokenizer (chat, text prompts with images)."""
    make_vl_checkpoint(path, family, **kwargs)
    write_vl_tokenizer(path)
    return path
