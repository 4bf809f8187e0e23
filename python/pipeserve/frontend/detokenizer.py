"""Output text of a request: one incremental detokenizer and stop-string matcher, used by every
front end (the HTTP server and the offline Engine), streaming or not.

Text is released only once no later token can change it, so that the released pieces always
concatenate to a prefix of the final text. The final text is computed once, at the end, as
`tokenizer.decode(output_ids)` cut before the stop string that ended the request; the last piece
is whatever of it was not released yet. Text is held back while

- the decoded tail is an incomplete character (it ends in U+FFFD), or is produced by a run of
  byte-fallback tokens (`<0xE4>`...: the tokenizer decodes such a run all at once, and all of it
  becomes U+FFFD if any byte of it is invalid);
- the tokenizer's clean-up rewrite (`clean_up_tokenization_spaces`) could still remove a space
  because of the characters that come next ("do n" + "'t" -> "don't");
- it could be the beginning of a stop string.

Each token costs O(1) decodes of a few tokens (amortised), never a decode of the whole output.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from pipeserve.sampling_params import SamplingParams

logger = logging.getLogger("pipeserve.detokenizer")

# What transformers' `clean_up_tokenization` removes the leading space of. Every rewrite deletes
# spaces only, and only a space that starts one of these patterns.
CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
# Text after the last space that may still grow into a pattern: a split there is unsafe.
_UNSAFE_TAILS = frozenset(p[1:k] for p in CLEANUP_PATTERNS for k in range(1, len(p)))
_PROBE = "a . b , c n't d 's"
_UNKNOWN_REWRITE = object()  # the tokenizer rewrites its text in a way this module cannot follow
_BACKOFF_TOKENS = 16  # beyond this many undecodable tokens, retry only every quarter as many
# a window grows to this many tokens before it moves on: a token costs one short decode, and one
# more only every few tokens, where the window moves
_WINDOW_TOKENS = 4


class Detokenizer:
    """What a tokenizer's decode does, learnt once; makes one TextStream per request."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.rewrite = _cleanup_rewrite(tokenizer)
        vocab = tokenizer.get_vocab()
        self.byte_ids = frozenset(vocab[t] for b in range(256) if (t := f"<0x{b:02X}>") in vocab)
        # skipped, a special token inside a run of byte tokens leaves the run whole
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.special_ids = frozenset(i for i, t in added.items() if getattr(t, "special", False))
        self.backend = _same_backend(tokenizer, self.special_ids)

    def stream(self, params: SamplingParams, incremental: bool = True) -> TextStream:
        """`incremental=False`: nobody reads the text before the end, so without stop strings
        the tokens are only kept, and decoded once by `finish`."""
        return TextStream(self, params, incremental)

    def raw_decode(self, skip_special_tokens: bool) -> Callable[[list[int]], str]:
        """`decode(ids, skip_special_tokens, raw=True)` as a function of the ids alone (the
        backend's own method where it decodes the same: one call per streamed token's decode)."""
        if self.backend is not None:
            return functools.partial(self.backend.decode, skip_special_tokens=skip_special_tokens)
        return lambda ids: self.decode(ids, skip_special_tokens, raw=True)

    def decode(self, ids: list[int], skip_special_tokens: bool, raw: bool = False) -> str:
        """The tokenizer's decode; `raw`: without its clean-up rewrite (straight to the `tokenizers`
        backend where it decodes the same: this runs for every streamed token)."""
        if raw and self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if raw:
            return self.tokenizer.decode(
                ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
            )
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _same_backend(tokenizer: Any, special_ids: frozenset[int]) -> Any:
    """The tokenizer's `tokenizers` backend if its raw decode is the tokenizer's own (checked on
    every 97th id of the vocabulary, special ones included, both skip settings), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "decode"):
        return None
    size = len(tokenizer.get_vocab())
    probe = [*range(0, size, 97), *sorted(special_ids)[:8]]
    for skip in (True, False):
        ours = backend.decode(probe, skip_special_tokens=skip)
        theirs = tokenizer.decode(
            probe, skip_special_tokens=skip, clean_up_tokenization_spaces=False
        )
        if ours != theirs:
            return None
    return backend


def _cleanup_rewrite(tokenizer: Any) -> Any:
    """None if decode returns the decoder's text as is; else the function it applies to it."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    ids = tokenizer.encode(_PROBE, add_special_tokens=False)
    raw = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    cooked = tokenizer.decode(ids)
    if raw == cooked:
        return None  # e.g. transformers ignores the flag for BPE tokenizers
    rewrite = getattr(tokenizer, "clean_up_tokenization", None)
    if rewrite is not None and rewrite(raw) == cooked:
        return rewrite
    logger.warning("the tokenizer's decode rewrites text in an unknown way: text comes at the end")
    return _UNKNOWN_REWRITE


class TextStream:
    """One request's text: `push` each output token, then `finish` once. Released text is in
    `pieces` (join them for the text so far); `matched` is the stop string that ended the
    request, if one did; `text` is the final text once finished."""

    def __init__(
        self, detok: Detokenizer, params: SamplingParams, incremental: bool = True
    ) -> None:
        self.detok = detok
        self.lazy = not incremental and not params.stop
        self.skip_special_tokens = params.skip_special_tokens
        self.stops = params.stop
        self.trim = not params.no_stop_trim
        self.longest = max(map(len, self.stops), default=0)
        # a stop string counts only if it ends after the text of the first min_new_tokens - 1
        # tokens (it may end in token number min_new_tokens); None until that text is known
        self.free_tokens = max(0, params.min_new_tokens - 1)
        self.boundary: int | None = 0 if self.free_tokens == 0 else None
        self.ids: list[int] = []
        self.byte_run = 0  # trailing byte-fallback tokens, not decoded yet
        self.window = _Window(detok.raw_decode(self.skip_special_tokens))
        self.cleaner = _Cleaner(detok.rewrite)
        self.stable_len = 0  # characters of text that no later token can change
        self.recent = ""  # the last `longest - 1` of them: where a stop string may have begun
        self.held = ""  # stable text not released: it may begin a stop string
        self.pieces: list[str] = []
        self.released_len = 0
        self.matched: str | None = None
        self.cut: int | None = None  # where the final text ends: before the matched stop string
        self.text: str | None = None

    def push(self, token_id: int) -> bool:
        """Adds one output token; True once a stop string has completed (push no more)."""
        self.ids.append(token_id)
        if self.lazy:
            return False
        if self.byte_run or token_id in self.detok.byte_ids:  # else it stays 0
            self.byte_run = self._byte_run(token_id)
        raw = self.window.advance(self.ids, len(self.ids) - self.byte_run)
        new = self.cleaner.feed(raw)
        if len(self.ids) == self.free_tokens:
            self.boundary = self.stable_len + len(new)
        if new:
            self._add(new)
        return self.matched is not None

    def _byte_run(self, token_id: int) -> int:
        if token_id in self.detok.byte_ids:
            return self.byte_run + 1
        skipped = self.skip_special_tokens and token_id in self.detok.special_ids
        return self.byte_run + 1 if skipped and self.byte_run else 0

    def _add(self, new: str) -> None:
        before = self.stable_len
        self.stable_len += len(new)
        if not self.stops:  # nothing is held back: all of it goes out
            self._release(new)
            return
        text = self.recent + new
        offset = before - len(self.recent)  # where text[0] is in the whole text
        self.recent = text[max(0, len(text) - self.longest + 1) :]
        if self.boundary is not None:
            hit = first_stop(text, self.stops, max(before, self.boundary) - offset)
            if hit is not None:
                self.cut, self.matched = offset + hit[0], hit[1]
                return
        self.held += new
        keep = self._stop_prefix_len() if self.trim else 0
        self._release(self.held[: len(self.held) - keep])
        self.held = self.held[len(self.held) - keep :]

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the held text that begins some stop string."""
        held = self.held
        for k in range(min(len(held), self.longest - 1), 0, -1):
            end = held[len(held) - k :]
            if any(s.startswith(end) for s in self.stops):
                return k
        return 0

    def _release(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            self.released_len += len(piece)

    def finish(self) -> None:
        """Computes the final text: the decode of every pushed token, cut before the stop string
        (one found now in the text not yet stable counts too), and releases the rest of it."""
        text = self.detok.decode(self.ids, self.skip_special_tokens)
        if self.matched is None and self.stops and self.boundary is not None:
            hit = first_stop(text, self.stops, max(self.stable_len, self.boundary))
            if hit is not None:
                self.cut, self.matched = hit
        if self.cut is not None and self.trim:
            text = text[: self.cut]
        if not text.startswith(self.released_text()):
            logger.warning("streamed text is not a prefix of the decoded text")
        self.text = text
        self._release(text[self.released_len :])

    def released_text(self) -> str:
        return "".join(self.pieces)

    def since(self, cursor: int) -> tuple[str, int]:
        """Text released after the first `cursor` pieces, and the cursor for the next call."""
        return "".join(self.pieces[cursor:]), len(self.pieces)


def first_stop(text: str, stops: tuple[str, ...], after: int) -> tuple[int, str] | None:
    """(start, stop) of the earliest stop string in `text` that ends beyond `text[:after]`; on a
    tie, the first of `stops`."""
    best: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop, max(0, after - len(stop) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best


class _Window:
    """Incremental decode: decodes the tokens not yet turned into text together with a few tokens
    before them as left context (a decoder may treat a sequence's first token specially, e.g.
    strip its leading space), and returns the text beyond that context."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.start = 0  # the window: ids[start:], whose first tokens are context
        self.read = 0  # ids before this index are text already
        self.context = ""  # decode(ids[start:read])
        self.taken = 0  # characters after the context already returned
        self.next_try = 0

    def advance(self, ids: list[int], limit: int) -> str:
        """New stable text of `ids[:limit]`."""
        if limit <= self.read or limit < self.next_try:
            return ""
        text = self.decode(ids[self.start : limit])
        if not text.startswith(self.context):
            self._back_off(limit)
            return ""
        tail = text[len(self.context) :]
        if not tail or tail[-1] == "\ufffd":  # only a trailing U+FFFD may still become a character
            stable = tail.rstrip("\ufffd")
            new = stable[self.taken :]
            self.taken = max(self.taken, len(stable))
            self._back_off(limit)
            return new
        new = tail[self.taken :]  # all of it is text
        if limit - self.start <= _WINDOW_TOKENS:  # the whole window is the next one's context
            self.context = text
        else:  # the next window starts at the tokens just read (one decode more)
            if self.start != self.read:
                tail = self.decode(ids[self.read : limit])
            self.start, self.context = self.read, tail
        self.read, self.taken, self.next_try = limit, 0, 0
        return new

    def _back_off(self, limit: int) -> None:
        """A long run of tokens that do not decode yet is retried ever less often, so that its
        decodes cost O(1) per token amortised."""
        pending = limit - self.read
        self.next_try = limit + pending // 4 if pending > _BACKOFF_TOKENS else 0


class _Cleaner:
    """Applies the tokenizer's clean-up rewrite to a growing text, releasing only a part that no
    later character can change: it ends where no pattern can reach across."""

    def __init__(self, rewrite: Any) -> None:
        self.rewrite = rewrite
        self.tail = ""

    def feed(self, raw: str) -> str:
        if self.rewrite is None:
            return raw
        if self.rewrite is _UNKNOWN_REWRITE:
            return ""
        checked = len(self.tail)  # no split up to here is safe, whatever follows
        self.tail += raw
        end = _safe_end(self.tail, checked)
        done, self.tail = self.tail[:end], self.tail[end:]
        return self.rewrite(done) if done else ""


def _safe_end(text: str, checked: int) -> int:
    """The largest end beyond `checked` of a prefix of `text` that the clean-up rewrites
    independently of what follows (the text after its last space cannot grow into a pattern, and
    appending never makes an unsafe end safe), or 0."""
    end = len(text)
    while end > checked and (space := text.rfind(" ", 0, end)) >= 0:
        if text[space + 1 : end] not in _UNSAFE_TAILS:
            break
        end = space
    return end if end > checked else 0
