"""The end-of-sequence ids that the ranks need, read as JSON from the checkpoint: no tokenizer."""

from __future__ import annotations

import json
import os


def eos_token_ids(model_path: str, tokenizer_path: str | None = None) -> set[int]:
    """EOS ids of config.json and generation_config.json, and the tokenizer's EOS token (named in
    tokenizer_config.json or special_tokens_map.json), all read as JSON: no tokenizer is loaded."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        eos = _read_json(model_path, name).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    path = tokenizer_path or model_path
    token = _eos_token(path)
    if token is not None and (token_id := _token_id(path, token)) is not None:
        ids.add(token_id)
    return ids


def _read_json(path: str, name: str) -> dict:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _eos_token(path: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        eos = _read_json(path, name).get("eos_token")
        if isinstance(eos, dict):  # an AddedToken written out: {"content": ..., ...}
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    return None


def _token_id(path: str, token: str) -> int | None:
    """The id of `token`: among the added tokens (tokenizer_config.json's, then tokenizer.json's),
    else in tokenizer.json's vocabulary."""
    added = _read_json(path, "tokenizer_config.json").get("added_tokens_decoder") or {}
    for token_id, entry in added.items():
        if isinstance(entry, dict) and entry.get("content") == token:
            return int(token_id)
    spec = _read_json(path, "tokenizer.json")
    for entry in spec.get("added_tokens") or []:
        if isinstance(entry, dict) and entry.get("content") == token:
            return int(entry["id"])
    vocab = (spec.get("model") or {}).get("vocab")
    found = vocab.get(token) if isinstance(vocab, dict) else None
    return found if isinstance(found, int) else None
