"""The one rule for whether a sequence fits the KV cache pool, shared by stage 0's scheduler and
every front end (which refuse first, with their own wording)."""

from __future__ import annotations


def kv_slots_needed(prompt_len: int, max_new_tokens: int, context_length: int) -> int:
    """KV slots a request may come to hold: its prompt and every new token, up to the context (the
    last sampled token never needs a slot, and a request ends at the context length)."""
    return min(prompt_len + max_new_tokens, context_length)
