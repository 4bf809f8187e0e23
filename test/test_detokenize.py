"""The front end's text: the incremental detokenizer and stop matcher against `tokenizer.decode`,
on byte-level BPE tokenizers (multi-byte characters split over byte tokens, with and without
transformers' clean-up rewrite) and a sentencepiece-style byte-fallback one."""

from __future__ import annotations

import random

import pytest

from pipeserve.frontend.detokenizer import Detokenizer
from pipeserve.sampling_params import SamplingParams
from text_models import byte_chars, byte_fallback_tokenizer, byte_level_tokenizer, unique_pieces

TEXT = "héllo wörld 你好吗 🙂🙂! do n't go . it 's ünïcödé → done"
KINDS = ["byte-level", "byte-level-cleanup", "byte-fallback"]


def make_tokenizer(kind: str):
    if kind == "byte-fallback":
        return byte_fallback_tokenizer()
    return byte_level_tokenizer(unique_pieces(TEXT), cleanup=kind.endswith("cleanup"))


@pytest.fixture(scope="module", params=KINDS)
def kind_and_tokenizer(request):
    return request.param, make_tokenizer(request.param)


@pytest.fixture(scope="module")
def tokenizer(kind_and_tokenizer):
    return kind_and_tokenizer[1]


@pytest.fixture(scope="module")
def byte_level():
    return byte_level_tokenizer(unique_pieces(TEXT))


_DETOKENIZERS: dict[int, tuple] = {}


def run(tok, ids: list[int], **params) -> tuple[list[str], str, int, str | None]:
    """Pushes `ids` one at a time until a stop string completes, then finishes: (released pieces,
    final text, tokens taken, matched stop string)."""
    if id(tok) not in _DETOKENIZERS:
        _DETOKENIZERS[id(tok)] = (tok, Detokenizer(tok))  # the tokenizer kept: ids stay unique
    stream = _DETOKENIZERS[id(tok)][1].stream(
        SamplingParams.from_dict({"max_new_tokens": 10_000, **params})
    )
    taken = 0
    for token in ids:
        taken += 1
        if stream.push(token):
            break
    stream.finish()
    return stream.pieces, stream.text, taken, stream.matched


def expected(tok, ids: list[int], stop: str | None, skip: bool = True) -> tuple[str, int]:
    """decode(ids) cut before `stop`, and the number of tokens up to the one completing it."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=skip)
        if stop is not None and stop in text:
            return text[: text.index(stop)], n
    return tok.decode(ids, skip_special_tokens=skip), len(ids)


def test_characters_split_over_tokens_stream_whole(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT)  # some characters do span several tokens
    pieces, text, taken, matched = run(tokenizer, ids)
    assert "".join(pieces) == text == tokenizer.decode(ids, skip_special_tokens=True)
    assert taken == len(ids) and matched is None
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", ["你好吗", "🙂🙂", "好", "d 你", "🙂", "n't go", "ö", "→ d"])
def test_a_stop_string_fires_on_the_token_that_completes_it(kind_and_tokenizer, stop):
    """(With byte fallback, on the token that ends the run of byte tokens it is part of: only
    then is the run's text known.)"""
    kind, tok = kind_and_tokenizer
    ids = tok.encode(TEXT)
    want, n = expected(tok, ids, stop)
    pieces, text, taken, matched = run(tok, ids, stop=[stop])
    assert matched == stop
    assert taken == n if kind != "byte-fallback" else taken >= n
    assert "".join(pieces) == text == want


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5, 8, 9, 12, 16, 20])
def test_stop_strings_of_1_to_20_tokens(byte_level, num_tokens):
    """Every stop string made of `num_tokens` whole tokens of the text fires where it completes."""
    ids = byte_level.encode(TEXT)
    for start in range(0, len(ids) - num_tokens, 3):
        stop = byte_level.decode(ids[start : start + num_tokens]).strip("\ufffd")
        if not stop:
            continue
        want, n = expected(byte_level, ids, stop)
        pieces, text, taken, matched = run(byte_level, ids, stop=[stop])
        assert (matched, taken) == (stop, n), stop
        assert "".join(pieces) == text == want


def test_clean_up_rewrite_streams_the_decoded_text():
    """transformers' clean-up removes a space that later characters decide on: "do n" + "'t"
    decodes to "don't". Streamed one token at a time, the text must be the decoded one, not
    "do n go" (the text before the rewrite, minus what it changed)."""
    tok = byte_level_tokenizer(cleanup=True)
    ids = tok.encode("I do n't go . It 's ok !")
    assert tok.decode(ids) == "I don't go. It's ok!"
    pieces, text, _, _ = run(tok, ids)
    assert "".join(pieces) == text == "I don't go. It's ok!"
    assert len(pieces) > 3  # released as it went, not all at the end


def test_clean_up_rewrite_on_random_text_dense_in_its_patterns():
    """Spaces, quotes and punctuation in every arrangement, one character per token (transformers'
    clean-up chains its rewrites: "a  ' s" becomes "a 's", then "a's")."""
    tok = byte_level_tokenizer(cleanup=True)
    rng = random.Random(0)
    for _ in range(1500):
        text = "".join(rng.choice("  'ntsmvre.,?!x") for _ in range(rng.randrange(1, 30)))
        ids = tok.encode(text)
        pieces, final, _, _ = run(tok, ids)
        assert "".join(pieces) == final == tok.decode(ids), text
    ids = tok.encode("a" + " " * 3000 + "b n't")
    pieces, final, _, _ = run(tok, ids)
    assert "".join(pieces) == final == "a" + " " * 3000 + "bn't"


def test_stop_strings_match_the_cleaned_text():
    tok = byte_level_tokenizer(cleanup=True)
    ids = tok.encode("I do n't go . It 's ok")
    pieces, text, taken, matched = run(tok, ids, stop=["go."])
    assert matched == "go." and "".join(pieces) == text == "I don't "
    assert tok.decode(ids[:taken]).endswith("go.")


def test_max_tokens_cutting_a_character_keeps_the_replacement_character(tokenizer):
    ids = tokenizer.encode("ab 你")
    cut = ids[:-1]  # the last byte of 你 is missing
    pieces, text, _, _ = run(tokenizer, cut)
    assert text.endswith("\ufffd") and text == tokenizer.decode(cut, skip_special_tokens=True)
    assert "".join(pieces) == text  # the stream sends it too, in its final piece
    assert "\ufffd" in pieces[-1]


def test_text_is_held_back_only_while_a_stop_string_could_still_complete(byte_level):
    ids = byte_level.encode("abcabd")
    stream = Detokenizer(byte_level).stream(SamplingParams(stop=("abd",)))
    released = []
    for token in ids[:5]:
        stream.push(token)
        released.append(stream.released_text())
    assert released == ["", "", "abc", "abc", "abc"]  # "ab" might begin "abd"
    assert stream.push(ids[5]) and stream.matched == "abd"
    stream.finish()
    assert stream.text == "abc"


def test_no_stop_trim_ends_at_the_stop_but_keeps_its_text(byte_level):
    ids = byte_level.encode(TEXT)
    pieces, text, taken, matched = run(byte_level, ids, stop=["你好吗"], no_stop_trim=True)
    assert matched == "你好吗" and text == byte_level.decode(ids[:taken])
    assert text.endswith("你好吗") and "".join(pieces) == text


def test_a_stop_string_before_min_new_tokens_neither_stops_nor_cuts(byte_level):
    ids = [byte_level.convert_tokens_to_ids(c) for c in "xbxxxxxb"]  # one token each
    pieces, text, taken, matched = run(byte_level, ids, stop=["b"], min_new_tokens=6)
    assert (text, taken, matched) == ("xbxxxxx", 8, "b")  # the first "b" came too early
    assert "".join(pieces) == text
    pieces, text, taken, matched = run(byte_level, ids[:7], stop=["b"], min_new_tokens=2)
    assert (text, taken, matched) == ("x", 2, "b")  # token 2 may end in a stop


def test_a_skipped_special_token_inside_a_stop_string(byte_level):
    """Stop strings match the text the request returns: with special tokens skipped, "2</s>-5"
    reads "2-5"; with them kept, it does not hold "2-5"."""
    eos = byte_level.eos_token_id
    ids = [*byte_level.encode("2"), eos, *byte_level.encode("-5")]
    assert run(byte_level, ids, stop=["2-5"])[1:] == ("", 4, "2-5")
    assert run(byte_level, ids, stop=["2-5"], skip_special_tokens=False)[3] is None


def test_a_stop_string_in_text_not_stable_yet_is_found_at_the_end(byte_level):
    """A tail that could still change (an incomplete character; a space that the clean-up may
    remove) is matched once the request has ended and the tail is final."""
    ids = byte_level.encode("ab 你")[:-1]
    pieces, text, taken, matched = run(byte_level, ids, stop=["b \ufffd"])
    assert (matched, text, taken) == ("b \ufffd", "a", len(ids)) and "".join(pieces) == text
    cleaning = byte_level_tokenizer(cleanup=True)
    ids = cleaning.encode("do n")
    pieces, text, taken, matched = run(cleaning, ids, stop=["n"])
    assert (matched, text, taken) == ("n", "do ", len(ids)) and "".join(pieces) == text


@pytest.mark.parametrize("kind", KINDS)
def test_random_tokens_and_stops_stream_the_decoded_text_cut_at_the_stop(kind):
    """Random id sequences (special tokens included) and stop strings drawn from their own text:
    the streamed pieces add up to the final text, which is decode(ids up to where the request
    stopped) cut before the stop string, and holds no stop string. On the plain byte-level
    tokenizer the stop fires on exactly the token that completes it."""
    tok = make_tokenizer(kind)
    rng = random.Random(kind)
    common = [*tok.encode(TEXT), tok.eos_token_id]
    for trial in range(1500):
        pool = range(len(tok)) if trial % 2 else common
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        skip = rng.random() < 0.8
        full = tok.decode(ids, skip_special_tokens=skip)
        starts = (
            [rng.randrange(len(full)) for _ in range(rng.choice([0, 1, 1, 2, 3]))] if full else []
        )
        # not across a U+FFFD: it may be a character still arriving
        stops = [s for a in starts if (s := full[a : a + rng.randrange(1, 8)].split("\ufffd")[0])]
        trim = rng.random() < 0.8
        free = rng.choice([0, 0, 0, 3, 10])  # min_new_tokens
        params = dict(stop=stops, skip_special_tokens=skip, no_stop_trim=not trim)
        pieces, text, taken, matched = run(tok, ids, min_new_tokens=free, **params)
        head = tok.decode(ids[:taken], skip_special_tokens=skip)
        case = (ids, params, free)
        assert "".join(pieces) == text, case
        if matched is None:
            assert taken == len(ids) and text == head, case
        elif trim:
            assert matched in stops and head[len(text) :].startswith(matched), case
        else:
            assert text == head, case
        if free or not trim:
            continue
        assert not any(s in text for s in stops), case
        found = [(expected(tok, ids, s, skip)[1], s) for s in stops if s in full]
        assert (matched is None) == (not found), case
        if found and kind == "byte-level":
            first = min(n for n, _ in found)
            assert taken == first, case
            text_first = tok.decode(ids[:first], skip_special_tokens=skip)
            assert (
                text == text_first[: min(text_first.find(s) for _, s in found if s in text_first)]
            )


def test_each_token_costs_a_bounded_decode():
    """No decode of the whole output per token: the tokens decoded over a request grow linearly,
    also through a long run of bytes that never form a character."""
    tok = byte_level_tokenizer()
    decoded = []
    decode = tok.decode

    def counting_decode(ids, **kwargs):
        decoded.append(len(ids))
        return decode(ids, **kwargs)

    class CountingBackend:  # the streamed tokens' decodes go to the tokenizers backend
        def __init__(self, backend) -> None:
            self.backend = backend

        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return self.backend.decode(ids, **kwargs)

    tok.decode = counting_decode
    junk = [tok.convert_tokens_to_ids(byte_chars()[0xFF])] * 3000  # never part of a character
    for ids in (tok.encode(TEXT * 60), junk, tok.encode(TEXT * 30) + junk):
        decoded.clear()
        detok = Detokenizer(tok)
        assert detok.backend is not None
        detok.backend = CountingBackend(detok.backend)
        stream = detok.stream(SamplingParams(stop=("zz", "你好吗!")))
        for token in ids:
            stream.push(token)
        stream.finish()
        assert len(decoded) < 2 * len(ids), (len(ids), len(decoded))  # calls
        assert sum(decoded) < 8 * len(ids), (len(ids), sum(decoded), max(decoded))
