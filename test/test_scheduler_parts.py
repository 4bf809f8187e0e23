"""Stage 0's small parts on their own: the KV index allocator, the front-end message codec and
the finish checker."""

from __future__ import annotations

import dataclasses
import math

import msgspec
import pytest

from pipeserve.ipc.messages import (
    GenerateBatch,
    GenerateReq,
    StepOut,
    StepOutBuilder,
    decode_output,
    decode_request,
    encode,
)
from pipeserve.sampling_params import SamplingParams
from pipeserve.scheduler.allocator import IndexAllocator
from pipeserve.scheduler.finish import FinishChecker
from pipeserve.scheduler.req import Req


def test_allocator_hands_out_lowest_first_and_reuses_freed_in_order():
    a = IndexAllocator(6, first=1)
    assert a.allocate(3) == [1, 2, 3]
    assert a.allocate(1) == [4]
    a.free([2, 3])
    assert a.num_free == 4
    assert a.allocate(3) == [2, 3, 5]  # freed ones first, in the order they were freed
    assert a.can_allocate(1) and not a.can_allocate(2)
    with pytest.raises(RuntimeError, match="asked for 2 entries, 1 free"):
        a.allocate(2)


def test_allocator_refuses_to_free_more_than_it_handed_out():
    a = IndexAllocator(4)
    got = a.allocate(2)
    a.free(got)
    with pytest.raises(RuntimeError, match="in use"):
        a.free([0])


def test_message_codec_round_trips_batches_and_outputs():
    batch = GenerateBatch(
        [GenerateReq("a", [1, 2], {"temperature": 0.0}, 7), GenerateReq("b", [3], {}, -1, True, 2)]
    )
    rows = StepOutBuilder()
    rows.add("a", [5], 2, 1)  # no logprobs asked: NaN once another row has them
    rows.add("b", [6], 1, 1, {"type": "length", "matched": None}, -0.5, [(6, -0.5), (2, -1.0)])
    rows.out.stats = {"running": 1}
    assert decode_request(encode(batch)) == batch
    out = decode_output(encode(rows.out))
    assert encode(out) == encode(rows.out)  # (NaN != NaN: compared as bytes)
    a, b = out.deltas()
    assert (a.rid, a.token_ids, a.finish_reason) == ("a", [5], None)
    assert math.isnan(a.logprobs[0]) and a.top_logprobs == [[]]
    assert (b.token_ids, b.logprobs, b.top_logprobs) == ([6], [-0.5], [[(6, -0.5), (2, -1.0)]])
    assert b.finish_reason == {"type": "length", "matched": None} and out.stats == {"running": 1}


def test_request_decoder_takes_front_end_messages_only():
    with pytest.raises(msgspec.DecodeError):
        decode_request(encode(StepOut()))
    with pytest.raises(msgspec.DecodeError):
        decode_request(b"\x93garbage")


def test_finish_checker_ends_on_tokens_only():
    """EOS (unless ignored, and not before min_new_tokens), stop token ids, max_new_tokens and the
    context length end a request on stage 0; stop strings are the front end's (no tokenizer here)."""
    check = FinishChecker({2}, context_length=8)
    params = SamplingParams(stop=("a",), stop_token_ids=(7,), max_new_tokens=4, min_new_tokens=2)

    def finish(ids: list[int], **changes) -> dict | None:
        return check(Req("r", [5, 6], dataclasses.replace(params, **changes), 0, output_ids=ids))

    assert finish([2]) is None  # before min_new_tokens
    assert finish([9, 2]) == {"type": "stop", "matched": 2}
    assert finish([9, 2], ignore_eos=True) is None
    assert finish([9, 7]) == {"type": "stop", "matched": 7}
    assert finish([9, 9]) is None  # whatever text these tokens are
    assert finish([9, 9, 9, 9]) == {"type": "length", "matched": None}
    assert finish([9] * 6, max_new_tokens=10) == {"type": "length", "matched": None}  # 2 + 6 = 8
