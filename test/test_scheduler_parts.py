"""Stage 0's small parts on their own: the KV index allocator and the front-end message codec."""

from __future__ import annotations

import pytest

from pipeserve.engine.ipc import GenerateBatch, GenerateReq, StepOut, TokenOut, decode, encode
from pipeserve.engine.kv_cache import IndexAllocator


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
    out = StepOut([TokenOut("a", [5], logprobs=[-0.5], top_logprobs=[[[5, -0.5]]])], {"running": 1})
    assert decode(encode(batch)) == batch
    assert decode(encode(out)) == out
