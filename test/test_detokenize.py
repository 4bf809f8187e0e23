"""Incremental detokenization: multi-byte characters split over byte-level tokens, stop strings."""

from __future__ import annotations

import pytest

from pipeserve.engine.tokenizer import IncrementalDetokenizer, StreamDecoder, trim_at_stop

TEXT = "héllo wörld 你好 🙂! ünïcödé → done"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE tokenizer that knows almost no merges, so most non-ASCII characters take
    two to four tokens (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        ["hello world", "abc def"], trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_characters_split_over_tokens_are_never_emitted_half(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT)  # some characters do span several tokens
    detok = IncrementalDetokenizer(byte_tokenizer)
    deltas = [detok.add([t]) for t in ids]
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_holds_back_a_possible_stop_string(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT)
    dec = StreamDecoder(byte_tokenizer, True, ("你好",))
    out = "".join(dec.push([t]) for t in ids[:-1]) + dec.push(ids[-1:], final=True)
    assert out == "héllo wörld "
    assert out == trim_at_stop(TEXT, ("你好",))


def test_stream_decoder_without_stops_streams_everything(byte_tokenizer):
    ids = byte_tokenizer.encode(TEXT)
    dec = StreamDecoder(byte_tokenizer, True, ())
    pieces = [dec.push(ids[i : i + 3], final=i + 3 >= len(ids)) for i in range(0, len(ids), 3)]
    assert "".join(pieces) == TEXT
