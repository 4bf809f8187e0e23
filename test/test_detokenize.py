"""Incremental detokenization: multi-byte characters split over byte-level tokens, stop strings
(streamed, and as the finish checker sees them)."""

from __future__ import annotations

import pytest

from pipeserve.engine.finish import FinishChecker
from pipeserve.engine.req import Req
from pipeserve.engine.sampling_params import SamplingParams
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


@pytest.mark.parametrize("stop", ["你好", "好", "d 你", "🙂"])
def test_finish_checker_fires_on_a_stop_string_ending_in_a_multi_token_character(
    byte_tokenizer, stop
):
    """The checker sees the output one token at a time; a stop string whose last character takes
    several byte tokens must fire on the token that completes it, and on no earlier one."""
    ids = byte_tokenizer.encode(TEXT)
    params = SamplingParams(stop=(stop,), max_new_tokens=len(ids))
    check = FinishChecker(set(), 10_000, byte_tokenizer.decode)
    req = Req("r", [0], params, seed=0)
    for token in ids:
        req.output_ids.append(token)
        if (finish := check(req)) is not None:
            break
    assert finish == {"type": "stop", "matched": stop}
    assert stop in byte_tokenizer.decode(req.output_ids)
    assert stop not in byte_tokenizer.decode(req.output_ids[:-1])


def test_stream_decoder_keeps_the_min_new_tokens_boundary_inside_one_push(byte_tokenizer):
    ids = [byte_tokenizer.convert_tokens_to_ids(c) for c in "xbxxxxxx"]  # one token each
    one_by_one = StreamDecoder(byte_tokenizer, True, ("b",), min_new_tokens=6)
    text = "".join(one_by_one.push([t], final=i == 7) for i, t in enumerate(ids))
    at_once = StreamDecoder(byte_tokenizer, True, ("b",), min_new_tokens=6)
    assert at_once.push(ids, final=True) == text == "xbxxxxxx"  # the only "b" came too early
