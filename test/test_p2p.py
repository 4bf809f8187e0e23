"""The tensor-dict P2P layer over real processes and gloo on 127.0.0.1."""

from __future__ import annotations

import collections
import os
import threading
import time

import numpy as np
import pytest
import torch

from dist_harness import run_ranks
from pipeserve.distributed import Channel, P2PError, P2PTimeoutError, get_pp_group, get_tp_group

PLAIN = {
    "name": "batch-7",
    "count": 3,
    "scale": 0.25,
    "flag": True,
    "nothing": None,
    "ids": ["a", "b", "c"],
    "pair": (1, (2.5, "x")),
}


def mixed_dict(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 10, generator=g)
    d = {
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(4, 3, generator=g).half(),
        "bf16": torch.randn(9, generator=g).bfloat16(),
        "i32": torch.randint(-1000, 1000, (3, 3), generator=g, dtype=torch.int32),
        "i64": torch.randint(-(2**40), 2**40, (11,), generator=g),
        "bool": torch.rand(2, 5, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
    }
    d.update(PLAIN)
    return d


def assert_bit_exact(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            g = got[k]
            assert g.dtype == v.dtype and g.shape == v.shape, k
            assert g.is_contiguous()
            if v.dtype.is_floating_point:
                bits = {
                    torch.float32: torch.int32,
                    torch.float16: torch.int16,
                    torch.bfloat16: torch.int16,
                }
                assert torch.equal(g.view(bits[v.dtype]), v.contiguous().view(bits[v.dtype])), k
            else:
                assert torch.equal(g, v), k
        else:
            assert got[k] == v and type(got[k]) is type(v), k


def _round_trip(rank: int) -> bool:
    pp = get_pp_group()
    if rank == 0:
        for seed in range(3):
            pp.send_tensor_dict(mixed_dict(seed))
        return True
    for seed in range(3):
        assert_bit_exact(pp.recv_tensor_dict(), mixed_dict(seed))
    return True


def test_round_trip_every_dtype_bit_exact():
    assert run_ranks(_round_trip) == {0: True, 1: True}


def _several_posted(rank: int) -> bool:
    pp = get_pp_group()
    msgs = [{"i": torch.full((i + 1, 64), float(i)), "tag": i} for i in range(4)]
    if rank == 0:
        works = [w for m in msgs for w in pp.isend_tensor_dict(m)]  # all posted before any wait
        for w in works:
            w.wait()
        return True
    posted = [pp.irecv_tensor_dict() for _ in msgs]  # four messages claimed before any wait
    for _, handles, postprocess in reversed(posted):
        for h in handles:
            h.wait()
        postprocess()
    for (tensor_dict, _, _), m in zip(posted, msgs, strict=True):
        assert_bit_exact(tensor_dict, m)
    return True


def test_receiver_posts_several_messages_before_waiting():
    assert run_ranks(_several_posted) == {0: True, 1: True}


def _interleaved(rank: int) -> bool:
    pp = get_pp_group()
    order = [
        (Channel.TOKENS, 0),
        (Channel.PROXY, 0),
        (Channel.TOKENS, 1),
        (Channel.PROXY, 1),
        (Channel.PROXY, 2),
    ]
    if rank == 0:
        works = []
        for ch, i in order:
            d = {"kind": ch.name, "i": i, "x": torch.full((3,), float(10 * int(ch) + i))}
            works += pp.isend_tensor_dict(d, channel=ch)
        for w in works:
            w.wait()
        return True
    # The receiver asks in an order the sender did not use: all PROXY first, then TOKENS.
    got = []
    for ch, n in ((Channel.PROXY, 3), (Channel.TOKENS, 2)):
        for i in range(n):
            d = pp.recv_tensor_dict(channel=ch)
            assert d["kind"] == ch.name and d["i"] == i
            assert torch.equal(d["x"], torch.full((3,), float(10 * int(ch) + i)))
            got.append((ch.name, i))
    return got


def test_channels_interleaved_reach_their_consumers():
    res = run_ranks(_interleaved)
    assert res[1] == [("PROXY", 0), ("PROXY", 1), ("PROXY", 2), ("TOKENS", 0), ("TOKENS", 1)]


def _tp_split(rank: int) -> dict:
    pp, tp = get_pp_group(), get_tp_group()
    g = torch.Generator().manual_seed(0)
    payload = {
        "hidden_states": torch.randn(16, 32, generator=g),  # numel % 2 == 0: split
        "odd": torch.randn(3, 5, generator=g),  # numel 15: sent whole
        "positions": torch.arange(24),  # opted out below
        "note": "x",
    }
    opt_out = {"positions": False}
    if pp.is_first_rank:
        pp.send_tensor_dict(
            payload, all_gather_group=tp, all_gather_tensors=opt_out, channel=Channel.PROXY
        )
        pp.send_tensor_dict(
            payload, all_gather_tensors=opt_out, channel=Channel.TOKENS
        )  # no TP group
        return {"sent": dict(pp.stats.sent)}
    split = pp.recv_tensor_dict(
        all_gather_group=tp, all_gather_tensors=opt_out, channel=Channel.PROXY
    )
    whole = pp.recv_tensor_dict(all_gather_tensors=opt_out, channel=Channel.TOKENS)
    assert_bit_exact(split, payload)
    assert_bit_exact(whole, payload)
    return {"received": dict(pp.stats.received)}


def test_tp_split_send_pp2_tp2():
    res = run_ranks(_tp_split, pp=2, tp=2)
    for sender, receiver in ((0, 2), (1, 3)):
        sent = res[sender]["sent"]
        split_bytes = sent[(receiver, "PROXY")]
        whole_bytes = sent[(receiver, "TOKENS")]
        hidden, odd, positions = 16 * 32 * 4, 15 * 4, 24 * 8
        assert whole_bytes == hidden + odd + positions
        # Only the splittable tensor shrinks, by exactly tp; the odd and the opted-out ones go whole.
        assert split_bytes == hidden // 2 + odd + positions
        assert res[receiver]["received"][(sender, "PROXY")] == sent[(receiver, "PROXY")]


def _big_split(rank: int) -> int:
    pp, tp = get_pp_group(), get_tp_group()
    x = torch.arange(4096 * 64, dtype=torch.float32).view(4096, 64)
    if pp.is_first_rank:
        pp.send_tensor_dict({"hidden_states": x}, all_gather_group=tp)
        return pp.stats.total_sent(Channel.PROXY)
    d = pp.recv_tensor_dict(all_gather_group=tp)
    assert torch.equal(d["hidden_states"], x)
    return pp.stats.total_received(Channel.PROXY)


def test_tp_split_bytes_drop_by_tp_factor():
    res = run_ranks(_big_split, pp=2, tp=2)
    full = 4096 * 64 * 4
    assert all(v == full // 2 for v in res.values())


def _dead_peer(rank: int) -> str:
    pp = get_pp_group()
    if rank == 0:
        pp.send_tensor_dict({"x": torch.ones(4)})
        time.sleep(0.5)
        os._exit(17)  # dies mid-conversation, without a word
    assert torch.equal(pp.recv_tensor_dict()["x"], torch.ones(4))
    start = time.monotonic()
    with pytest.raises(P2PError) as info:
        pp.recv_tensor_dict(timeout=10.0)
    elapsed = time.monotonic() - start
    assert elapsed < 10.5
    return str(info.value)


def test_dead_peer_raises_naming_peer_and_channel():
    res = run_ranks(_dead_peer, may_die=frozenset({0}))
    assert "rank 0" in res[1] and "PROXY" in res[1]


def _silent_peer(rank: int) -> str:
    pp = get_pp_group()
    if rank == 0:
        time.sleep(4)
        return "idle"
    start = time.monotonic()
    with pytest.raises(P2PTimeoutError) as info:
        pp.recv_tensor_dict(timeout=1.0, channel=Channel.TOKENS)
    assert time.monotonic() - start < 3.0
    return str(info.value)


def test_silent_peer_times_out_naming_peer_and_channel():
    res = run_ranks(_silent_peer)
    assert "rank 0" in res[1] and "TOKENS" in res[1] and "1.0s" in res[1]


def _unsendable(rank: int) -> bool:
    pp = get_pp_group()
    if rank == 0:
        for bad in (
            {"obj": object()},
            {"x": torch.ones(2), "fn": print},
            {"t": torch.ones(2, dtype=torch.complex64)},
            {3: 1},
            # subclasses of plain types pickle as classes, which the receiver refuses
            {"channel": Channel.PROXY},
            {"pair": [1, collections.namedtuple("Pair", "a b")(1, 2)]},
            {"seconds": np.float64(0.5)},
        ):
            with pytest.raises(TypeError):
                pp.isend_tensor_dict(bad)
        with pytest.raises(TypeError):
            pp.send_object({"kind": Channel.TOKENS})
        assert pp.stats.total_sent() == 0  # nothing reached the wire
        pp.send_tensor_dict({"ok": torch.arange(3)})
        return True
    d = pp.recv_tensor_dict()  # the first message the receiver sees is the good one
    assert list(d) == ["ok"] and torch.equal(d["ok"], torch.arange(3))
    return True


def test_unsendable_value_raises_type_error_before_the_wire():
    assert run_ranks(_unsendable) == {0: True, 1: True}


def _large_header(rank: int) -> bool:
    pp = get_pp_group()
    payload = {"ids": [f"request-{i:05d}" for i in range(2000)], "x": torch.arange(5)}
    if rank == 0:
        pp.send_tensor_dict(payload)
        pp.send_tensor_dict({"after": 1})
        pp.send_object({"a": [1, 2], "b": "c" * 10000})
        return True
    assert_bit_exact(pp.recv_tensor_dict(), payload)
    assert pp.recv_tensor_dict() == {"after": 1}
    assert pp.recv_object() == {"a": [1, 2], "b": "c" * 10000}
    return True


def test_header_larger_than_a_frame_and_objects():
    assert run_ranks(_large_header) == {0: True, 1: True}


def _garbage_header(rank: int) -> str:
    pp = get_pp_group()
    if rank == 0:
        junk = torch.full((64,), 7, dtype=torch.uint8)
        pp.post_send(junk, 1, Channel.PROXY, Channel.PROXY.header_tag, "junk", cpu=True).wait()
        return "sent"
    with pytest.raises(P2PError) as info:
        pp.recv_tensor_dict()
    return str(info.value)


def test_malformed_header_is_an_error_naming_the_peer():
    res = run_ranks(_garbage_header)
    assert "rank 0" in res[1] and "PROXY" in res[1]


def _into(rank: int) -> bool:
    pp = get_pp_group()
    big = torch.arange(300_000, dtype=torch.float32)  # out of line: larger than a frame's budget
    if rank == 0:
        pp.send_tensor_dict({"x": big, "small": torch.ones(3)}, dst=1)
        pp.isend_tensor_dict({"x": big}, dst=1)  # refused by the receiver: never completes
        return True
    buffer = torch.zeros(400_000)
    got = pp.recv_tensor_dict(src=0, into={"x": buffer, "small": torch.zeros(8)})
    assert torch.equal(got["x"], big) and got["x"].data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[: big.numel()], big)
    assert torch.equal(got["small"], torch.ones(3))  # inline: a view of its frame
    with pytest.raises(P2PError, match="does not fit its receive buffer"):
        pp.recv_tensor_dict(src=0, into={"x": torch.zeros(10)})
    return True


def test_a_receive_lands_in_the_consumers_buffer_and_a_misfit_is_an_error():
    assert run_ranks(_into) == {0: True, 1: True}


def test_latch_wakes_its_waiter_and_stays_set() -> None:
    from pipeserve.distributed.work import Latch

    latch = Latch()
    assert not latch.is_set() and not latch.wait(0.01) and not latch.wait(-1.0)
    threading.Timer(0.05, latch.set).start()
    start = time.monotonic()
    assert latch.wait(5.0) and time.monotonic() - start < 2.0
    assert latch.is_set() and latch.wait(0.0) and latch.wait()  # later waits return at once
