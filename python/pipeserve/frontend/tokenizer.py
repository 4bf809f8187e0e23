"""Tokenizer loading (the front ends' only use of `transformers`)."""

from __future__ import annotations

import json
import os
from typing import Any

# A directory holding none of these has no tokenizer for transformers to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerNotFound(FileNotFoundError):
    """The tokenizer directory holds no tokenizer."""


def load_tokenizer(path: str) -> Any:
    """A `transformers` tokenizer from a local directory (never the network)."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise TokenizerNotFound(
            f"no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)}): give one with "
            "--tokenizer-path, or serve token ids only with --skip-tokenizer-init "
            "(skip_tokenizer_init=True offline)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _processor_chat_template(path)
    return tokenizer


def _processor_chat_template(path: str) -> str | None:
    """The template of a processor's chat_template.json (vision-language checkpoints may keep
    their template only there, where a tokenizer does not look)."""
    file = os.path.join(path, "chat_template.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f).get("chat_template")
