"""How many characters a prompt may have before it is tokenized: a text that cannot fit the
context even if every token covered as many characters as the longest one of the vocabulary is
refused without tokenizing it (tokenizing megabytes costs seconds and memory)."""

from __future__ import annotations

import json
from typing import Any

# Unicode canonical composition (NFC, NFKC) merges at most 4 code points into one (the longest
# canonical decomposition has 4), so a normalized text has at least a quarter of the characters.
_COMPOSITION = 4
# Normalizers that never delete characters: the Llama, Mistral and Qwen tokenizers use these.
_KEEPING = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Sequence", "Replace"}


def max_prompt_chars(tokenizer: Any, context_length: int) -> int | None:
    """Characters beyond which a prompt cannot fit `context_length` tokens, for a BPE tokenizer
    (each token a merge of characters, or of bytes, which are never fewer); None for other models
    (a WordLevel or Unigram unknown token may cover a whole word) and for BPE models that may delete
    characters or fuse unknown ones: no character count is a sound bound for those."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or _fuses_unknown(model):
        return None
    if not _keeps_characters(spec.get("normalizer")):
        return None
    longest = max((len(token) for token in tokenizer.get_vocab()), default=0)
    return context_length * max(1, longest) * _COMPOSITION


def _keeps_characters(normalizer: dict | None) -> bool:
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_keeps_characters(n) for n in normalizer.get("normalizers", []))
    if kind == "Replace":  # keeps when no match is replaced by fewer characters
        pattern = (normalizer.get("pattern") or {}).get("String")
        return pattern is not None and len(normalizer.get("content") or "") >= len(pattern)
    return kind in _KEEPING


def _fuses_unknown(model: dict) -> bool:
    """Fuses a run of unknown characters into one token, without byte fallback: one token may
    then cover any number of characters."""
    return bool(model.get("fuse_unk")) and not model.get("byte_fallback")


# Pieces the cut of a prefix may change: the one it splits, and the one before when the
# pre-tokenizer's pattern looks one character ahead (GPT-2's `\s+(?!\S)`).
_CUT_PIECES = 2


class PieceBound:
    """A lower bound on a text's token count that costs a prefix, for every tokenizer whose
    pre-tokenizer splits text into pieces that each become at least one token (WordLevel,
    WordPiece and Unigram always: an unknown piece is one unknown token; BPE with an unknown
    token or byte fallback). `max_prompt_chars` has no bound where one token may cover any number
    of characters (the embedded model's unknown token covers a whole run of newlines); counting
    the pieces of a growing prefix still refuses a text of megabytes after a few thousand
    characters, while a text that could fit is always tokenized in full."""

    def __init__(self, backend: Any) -> None:
        self.normalizer = backend.normalizer
        self.pre_tokenizer = backend.pre_tokenizer

    @classmethod
    def of(cls, tokenizer: Any) -> PieceBound | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.pre_tokenizer is None:
            return None
        model = json.loads(backend.to_str()).get("model") or {}
        kind = model.get("type")
        if kind == "BPE" and not (model.get("unk_token") or model.get("byte_fallback")):
            return None  # an unknown character is dropped: a piece may become no token
        return cls(backend) if kind in ("BPE", "WordLevel", "WordPiece", "Unigram") else None

    def at_least(self, text: str, count: int) -> bool:
        """True if `text` certainly has `count` pieces or more: pieces of a prefix that the cut
        cannot have changed are pieces of the text too. False says nothing: a text that short, or
        that sparse in pieces, costs little more to tokenize than to count."""
        size = 4 * (count + _CUT_PIECES)
        while size < len(text):
            if self._pieces(text[:size]) - _CUT_PIECES >= count:
                return True
            size *= 4
        return False

    def _pieces(self, text: str) -> int:
        if self.normalizer is not None:
            text = self.normalizer.normalize_str(text)
        return len(self.pre_tokenizer.pre_tokenize_str(text))
