"""Fault injection against the P2P layer over real gloo ranks: raw frames on the layer's own tags,
killed senders, messages of the wrong kind. Every case must end in a P2PError naming the peer and
the channel (or, after a timeout, lose nothing), within a hard time limit: a hang fails the case."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
import time

import pytest
import torch

from dist_harness import run_ranks
from pipeserve.distributed import Channel, Limits, P2PError, P2PTimeoutError, get_pp_group
from pipeserve.distributed.frame import FRAME_BYTES, FRAME_CAPACITY, pack_frame
from pipeserve.distributed.send_plan import plan_send
from pipeserve.distributed.wire import MessageKind, ProtocolError

CASE_TIMEOUT_S = 40
RECV_TIMEOUT_S = 10.0  # every receive below is bounded; the harness bounds the whole case


def inject(
    pp, channel: Channel, header: bytes, inline=(), kind=MessageKind.TENSOR_DICT, seq=0, cut=None
):
    """Sends a frame built by the layer's own packer (optionally cut short) on `channel`'s header tag."""
    frame, _ = pack_frame(channel, kind, seq, pp.rank, header, list(inline))
    if cut is not None:
        frame = frame[:cut].clone()
    pp.post_send(frame, 1, channel, channel.header_tag, "raw frame", cpu=True).wait()


def tensor_row(key="x", dtype="float32", shape=(4,), inline=True, device="cpu") -> tuple:
    return ("t", key, device, dtype, shape, False, inline)


def header(*rows) -> bytes:
    return pickle.dumps(list(rows))


def expect_error(fn, match: str = "") -> str:
    start = time.monotonic()
    with pytest.raises(P2PError) as info:
        fn()
    assert time.monotonic() - start < RECV_TIMEOUT_S + 1
    text = str(info.value)
    assert re.search(match, text), text
    return text


def recv(pp, channel=Channel.PROXY):
    return lambda: pp.recv_tensor_dict(src=0, channel=channel, timeout=RECV_TIMEOUT_S)


class Evil:
    """A pickle that, loaded by plain pickle.loads, creates a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- cases: each returns the receiver's error texts, checked for peer and channel --------------
def _cut_frame(rank: int, cut: str) -> list[str]:
    pp = get_pp_group()
    seven = torch.full((4,), 7.0)
    if rank == 0:
        full, _ = pack_frame(
            Channel.PROXY, MessageKind.TENSOR_DICT, 0, 0, header(tensor_row()), [seven]
        )
        at = {"10 bytes": 10, "no trailer": full.numel() - 8, "half": full.numel() // 2}[cut]
        inject(pp, Channel.PROXY, header(tensor_row()), [seven], cut=at)
        pp.send_tensor_dict({"x": seven}, dst=1)  # a good message after: the channel stays broken
        return []
    first = expect_error(recv(pp), "cut short|inconsistent|magic|desync")
    return [first, expect_error(recv(pp))]


def _missing_inline(rank: int) -> list[str]:
    pp = get_pp_group()
    if rank == 0:
        inject(pp, Channel.PROXY, header(tensor_row()))  # lists 16 inline bytes, carries none
        inject(pp, Channel.TOKENS, header(tensor_row(shape=(2,))), [torch.ones(4)])
        inject(pp, Channel.REQUESTS, header(tensor_row(shape=(0,))))  # inline, yet of no bytes
        return []
    return [
        expect_error(recv(pp), "inline bytes"),
        expect_error(recv(pp, Channel.TOKENS), "inline bytes"),
        expect_error(recv(pp, Channel.REQUESTS), "no bytes"),
    ]


def _wrong_kind(rank: int) -> list[str]:
    pp = get_pp_group()
    if rank == 0:
        pp.send_object({"a": 1}, dst=1, channel=Channel.PROXY)
        pp.send_tensor_dict({"x": torch.ones(2)}, dst=1, channel=Channel.OBJECT)
        pp.send_object({"b": 2}, dst=1, channel=Channel.TOKENS)
        return []
    _, handles, _ = pp.irecv_tensor_dict(src=0, channel=Channel.TOKENS)
    return [
        expect_error(recv(pp), "OBJECT message .* TENSOR_DICT was expected"),
        expect_error(lambda: pp.recv_object(src=0, timeout=RECV_TIMEOUT_S), "TENSOR_DICT message"),
        expect_error(lambda: handles[0].wait(RECV_TIMEOUT_S), "OBJECT message"),
    ]


def _crafted_pickle(rank: int, path: str) -> list[str]:
    pp = get_pp_group()
    evil = pickle.dumps(Evil(path))
    if rank == 0:
        inject(pp, Channel.OBJECT, evil, kind=MessageKind.OBJECT)
        inject(pp, Channel.PROXY, evil)
        inject(pp, Channel.TOKENS, header(tensor_row(), Evil(path)))
        return []
    errors = [
        expect_error(lambda: pp.recv_object(src=0, timeout=RECV_TIMEOUT_S), "only plain values"),
        expect_error(recv(pp), "only plain values"),
        expect_error(recv(pp, Channel.TOKENS), "only plain values"),
    ]
    assert not os.path.exists(path)
    return errors


def _declared_sizes(rank: int) -> list[str]:
    pp = get_pp_group()
    bad_rows = [
        tensor_row(shape=(2**40,), inline=False),  # 4 TiB of float32
        tensor_row(dtype="complex64", inline=False),
        tensor_row(shape=(-1, 4), inline=False),
        tensor_row(shape=("4",), inline=False),
        tensor_row(device="tpu", inline=False),
    ]
    channels = [Channel.OBJECT, Channel.PROXY, Channel.TOKENS, Channel.REQUESTS, Channel.CONTROL]
    if rank == 0:
        for ch, row in zip(channels, bad_rows, strict=True):
            inject(pp, ch, header(row))
        return []
    return [
        expect_error(recv(pp, ch), what)
        for ch, what in zip(
            channels,
            [
                "over the limit",
                "unknown dtype",
                "impossible shape",
                "impossible shape",
                "malformed",
            ],
            strict=True,
        )
    ]


def _configured_limit(rank: int) -> list[str]:
    pp = get_pp_group()
    if rank == 0:
        pp.send_tensor_dict({"x": torch.zeros(2000)}, dst=1)  # 8000 bytes
        with pytest.raises(ValueError, match="over the receivers' limit"):
            pp.limits = Limits(max_message_bytes=4000)  # a sender checks its own limit too
            pp.isend_tensor_dict({"x": torch.zeros(2000)}, dst=1)
        return []
    pp.limits = Limits(max_message_bytes=4000)
    return [expect_error(recv(pp), "8000 tensor bytes, over the limit of 4000")]


def _dead_peer_new_operations(rank: int) -> list[str]:
    pp = get_pp_group()
    if rank == 0:
        pp.send_tensor_dict({"x": torch.ones(2)}, dst=1)
        time.sleep(0.3)
        os._exit(3)
    pp.recv_tensor_dict(src=0, timeout=RECV_TIMEOUT_S)
    time.sleep(1.5)  # rank 0 is gone

    def send() -> None:
        for w in pp.isend_tensor_dict({"y": torch.ones(100_000)}, dst=0, channel=Channel.TOKENS):
            w.wait(RECV_TIMEOUT_S)

    return [
        expect_error(recv(pp, Channel.REQUESTS), "rank 0.*REQUESTS"),
        expect_error(send, "rank 0.*TOKENS"),
        expect_error(lambda: pp.send_object({"z": 1}, dst=0, channel=Channel.CONTROL), "CONTROL"),
        expect_error(recv(pp, Channel.SGLANG), "rank 0.*SGLANG"),
    ]


def _killed_mid_message(rank: int) -> list[str]:
    pp = get_pp_group()
    if rank == 0:
        plan = pp.plan_send({"x": torch.ones(300_000)}, None, None)  # out of line: header alone
        for w in pp.post_header(1, Channel.PROXY, MessageKind.TENSOR_DICT, plan.header):
            w.wait()
        time.sleep(0.5)
        os._exit(3)  # the tensor never follows
    return [expect_error(recv(pp), "tensor 'x'")]


def _sglang_wire(rank: int, path: str) -> list[str]:
    """Channel.SGLANG (SGLang's own wire on tag 0): a pickled class, and a declared tensor beyond
    the limit; each on its own peer pair (the pp group and the world group)."""
    from pipeserve.distributed import get_world_group
    from pipeserve.distributed.sglang_wire import TensorMetadata, _Pickler

    pp, world = get_pp_group(), get_world_group()
    if rank == 0:
        evil = pickle.dumps([("x", Evil(path))])
        out = io.BytesIO()  # written under SGLang's class path, as SGLang's sender writes it
        _Pickler(out, protocol=4).dump([("x", TensorMetadata("cpu", torch.float32, (2**40,)))])
        huge = out.getvalue()
        for coord, payload in ((pp, evil), (world, huge)):
            link = coord.sglang_link
            size = torch.tensor([len(payload)], dtype=torch.int64)
            link.post(size, 1, "raw size", True).wait()
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            link.post(data, 1, "raw header", True).wait()
        return []
    errors = [
        expect_error(recv(pp, Channel.SGLANG), "SGLang header refers to"),
        expect_error(
            lambda: world.recv_tensor_dict(0, RECV_TIMEOUT_S, channel=Channel.SGLANG), "limit"
        ),
    ]
    assert not os.path.exists(path)
    return errors


CASES = {
    "frame cut to 10 bytes": (_cut_frame, ("10 bytes",)),
    "frame without its trailer": (_cut_frame, ("no trailer",)),
    "frame cut in half": (_cut_frame, ("half",)),
    "inline bytes missing or extra": (_missing_inline, ()),
    "message of the wrong kind": (_wrong_kind, ()),
    "class in a pickled header": (_crafted_pickle, None),
    "impossible declared sizes": (_declared_sizes, ()),
    "configured size limit": (_configured_limit, ()),
    "new operations after the peer died": (_dead_peer_new_operations, ()),
    "sender killed mid-message": (_killed_mid_message, ()),
    "SGLang wire: class or size beyond the limit": (_sglang_wire, None),
}


@pytest.mark.timeout(CASE_TIMEOUT_S + 10)
@pytest.mark.parametrize("case", list(CASES))
def test_fault_is_an_error_naming_peer_and_channel(case: str, tmp_path: pathlib.Path) -> None:
    fn, args = CASES[case]
    if args is None:
        args = (str(tmp_path / "pwned"),)
    dies = frozenset({0}) if "died" in case or "killed" in case else frozenset()
    res = run_ranks(fn, args=args, timeout=CASE_TIMEOUT_S, may_die=dies)
    assert res[1], case
    for text in res[1]:
        assert "rank 0" in text and re.search(r"channel [A-Z]+", text), text
    assert not (tmp_path / "pwned").exists()


# ---- no loss after a timeout --------------------------------------------------------------------
def _timeout_then_retry(rank: int) -> list:
    pp = get_pp_group()
    if rank == 0:  # each pair goes out well after the receiver's first, short wait ran out
        time.sleep(1.5)
        for i in range(2):
            pp.send_tensor_dict({"i": i, "x": torch.full((3,), float(i))}, dst=1)
        time.sleep(1.5)
        for i in range(2):
            pp.send_object({"i": i}, dst=1)
        return []
    got = []
    for receive in (
        lambda t: pp.recv_tensor_dict(src=0, timeout=t),
        lambda t: pp.recv_object(src=0, timeout=t),
    ):
        with pytest.raises(P2PTimeoutError):
            receive(0.3)
        got.append(receive(RECV_TIMEOUT_S)["i"])
        got.append(receive(RECV_TIMEOUT_S)["i"])
    return got


@pytest.mark.timeout(CASE_TIMEOUT_S + 10)
def test_a_timed_out_receive_loses_nothing() -> None:
    assert run_ranks(_timeout_then_retry, timeout=CASE_TIMEOUT_S)[1] == [0, 1, 0, 1]


# ---- sender-side guarantees and the decoder, without processes -----------------------------------
def test_a_frame_never_exceeds_the_posted_buffer() -> None:
    with pytest.raises(ProtocolError):
        pack_frame(
            Channel.PROXY, MessageKind.TENSOR_DICT, 0, 0, b"x" * 100, [torch.ones(FRAME_BYTES // 4)]
        )
    # a header that nearly fills a frame pushes the small tensors out of line
    text = "x" * (FRAME_CAPACITY - 3000)
    plan = plan_send({"text": text, "x": torch.ones(1000)}, None, None, Limits())
    assert not plan.inline and [k for k, _ in plan.out_of_line] == ["x"]
    small = plan_send({"text": text[:100], "x": torch.ones(1000)}, None, None, Limits())
    assert len(small.inline) == 1
    for p in (plan, small):
        frame, _ = pack_frame(Channel.PROXY, MessageKind.TENSOR_DICT, 0, 0, p.header, p.inline)
        assert frame.numel() <= FRAME_BYTES


def test_no_plain_pickle_loads_on_the_wire() -> None:
    package = pathlib.Path(__file__).parents[1] / "python" / "pipeserve" / "distributed"
    for path in package.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"pickle\.(loads|load|Unpickler\()|torch\.load\(", text), path
        assert "broadcast_object_list" not in text and "recv_object_list" not in text, path
