"""Stage 0's small parts on their own: the KV index allocator, the front-end message codec and
the finish checker."""

from __future__ import annotations

import pytest

from checkpoints import make_checkpoint
from pipeserve.engine.finish import FinishChecker
from pipeserve.engine.ipc import GenerateBatch, GenerateReq, StepOut, TokenOut, decode, encode
from pipeserve.engine.kv_cache import IndexAllocator
from pipeserve.engine.req import Req
from pipeserve.engine.sampling_params import SamplingParams
from pipeserve.engine.tokenizer import load_tokenizer


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


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stop_strings_match_the_text_the_request_returns(tmp_path, skip_special_tokens):
    """A special token sampled inside a stop string hides from the returned text when special
    tokens are skipped; the stop must then fire, as the text shows the stop string whole."""
    tok = load_tokenizer(make_checkpoint(str(tmp_path), "llama", layers=1, heads=2, kv_heads=2))
    ids = [tok.convert_tokens_to_ids(c) for c in "2"] + [tok.eos_token_id]
    ids += [tok.convert_tokens_to_ids(c) for c in "-5"]
    params = SamplingParams(
        stop=("2-5",), ignore_eos=True, max_new_tokens=99, skip_special_tokens=skip_special_tokens
    )
    req = Req("r", [5, 6], params, seed=0, output_ids=ids)
    finish = FinishChecker({tok.eos_token_id}, 512, tok.decode)(req)
    if skip_special_tokens:
        assert finish == {"type": "stop", "matched": "2-5"}
    else:
        assert finish is None  # the text holds "2</s>-5", which does not contain "2-5"
