"""Tokenizer loading, end-of-sequence ids, and incremental detokenization."""

from __future__ import annotations

import json
import os
from typing import Any


def load_tokenizer(path: str) -> Any:
    """A `transformers` fast tokenizer from a local directory (never the network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def eos_token_ids(model_path: str, tokenizer: Any | None = None) -> set[int]:
    """EOS ids of config.json, generation_config.json and the tokenizer, together."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence; holds back bytes of an unfinished character."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the rest
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)


def trim_at_stop(text: str, stops: tuple[str, ...], after: int = 0) -> str:
    """Cuts `text` before the first stop string that ends beyond its first `after` characters
    (OpenAI semantics: the stop string is not returned). `after`: the text of the tokens sampled
    before min_new_tokens allowed a stop."""
    return text[: find_stop(text, stops, after)]


def decoded_len(text: str) -> int:
    """Length of the complete characters of `text`: a decode that ends inside a multi-byte
    character ends in replacement characters, which the next token turns into that character."""
    return len(text.rstrip("\ufffd"))


def find_stop(text: str, stops: tuple[str, ...], after: int = 0) -> int | None:
    """Where the first stop string that ends beyond `text[:after]` begins, or None."""
    found = [i for s in stops if (i := text.find(s, max(0, after - len(s) + 1))) >= 0]
    return min(found, default=None)


class StreamDecoder:
    """Text deltas for streaming: withholds a tail that could still grow into a stop string, and
    ends the text before a stop string that appears."""

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool,
        stops: tuple[str, ...],
        min_new_tokens: int = 0,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.tokens, self.min_new_tokens = 0, min_new_tokens
        self.free_from = 0  # text length before the token that may first end in a stop

    def push(self, token_ids: list[int], final: bool = False) -> str:
        # the tokens before the min_new_tokens boundary apart: their text cannot end in a stop
        early = max(0, self.min_new_tokens - 1 - self.tokens)
        for part in (token_ids[:early], token_ids[early:]):
            if part:
                self.text += self.detok.add(part)
                self.tokens += len(part)
            if self.tokens < self.min_new_tokens:
                self.free_from = len(self.text)
        if self.stopped:
            return ""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        cut = find_stop(self.text, self.stops, self.free_from)
        if cut is not None:
            self.stopped, end = True, cut
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta
