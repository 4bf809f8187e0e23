"""pipeserve's SGLang wire against SGLang itself (its GroupCoordinator over real gloo ranks): SGLang
sends, pipeserve receives asynchronously, and back, byte for byte; the all-gather split of a pp 2 x
tp 2 grid; a patched GroupCoordinator against an unpatched one."""

from __future__ import annotations

import pickle

import pytest
import torch

from dist_harness import run_ranks

# installed by scripts/setup.sh where its wheel exists (Linux x86_64, CPython 3.11 and 3.12); where
# it is, a missing dependency of its parallel_state is an error here, not a skip
pytest.importorskip("sglang")
from sglang.srt.distributed import parallel_state  # noqa: F401

WAIT_S = 30.0  # every wait below is bounded


def sglang_groups(pp: int, tp: int) -> tuple:
    """SGLang's own PP and TP GroupCoordinators (gloo), built on every rank in the same order."""
    from sglang.srt.distributed import parallel_state as ps

    def make(groups: list[list[int]], name: str):
        return ps.init_model_parallel_group(
            groups,
            0,
            "gloo",
            use_pynccl=False,
            use_custom_allreduce=False,
            use_mscclpp=False,
            use_torch_symm_mem_allreduce=False,
            group_name=name,
        )

    tp_group = make([[p * tp + t for t in range(tp)] for p in range(pp)], "tp")
    pp_group = make([[p * tp + t for p in range(pp)] for t in range(tp)], "pp")
    return pp_group, tp_group


def pipeserve_view(sgl_group):
    """A pipeserve GroupCoordinator over the process groups of an SGLang one."""
    from pipeserve.distributed import GroupCoordinator

    return GroupCoordinator(
        sgl_group.ranks, sgl_group.cpu_group, {}, torch.device("cpu"), "pp-over-sglang"
    )


def mixed(seed: int, contiguous: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 10, generator=g)
    d = {
        "hidden_states": torch.randn(8, 16, generator=g).bfloat16(),
        "residual": torch.randn(8, 16, generator=g).half(),
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "i32": torch.randint(-99, 99, (2, 3), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(4, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "empty_i": torch.empty(3, 0, dtype=torch.int64),
        "t": base.t() if not contiguous else base.t().contiguous(),
        "__msg_type__": "proxy",
        "count": seed,
        "ids": ["a", "b"],
        "none": None,
    }
    return d


def assert_bytes_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        if not isinstance(v, torch.Tensor):
            assert got[k] == v and type(got[k]) is type(v), k
            continue
        g = got[k]
        assert g.dtype == v.dtype and g.shape == v.shape, k
        as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(as_bytes(g), as_bytes(v)), k


def wait_all(handles, postprocess) -> dict:
    for h in handles:
        h.wait(WAIT_S)
    return postprocess()


def _two_ranks(rank: int) -> bool:
    import pipeserve.distributed.sglang as ps_sglang
    from pipeserve.distributed import Channel

    sgl_pp, _ = sglang_groups(2, 1)
    ours = pipeserve_view(sgl_pp)
    if rank == 0:  # SGLang as shipped sends; then receives what pipeserve sends
        works = [
            w for seed in range(2) for w in sgl_pp.send_tensor_dict(mixed(seed), async_send=True)
        ]
        sgl_pp.send_tensor_dict(mixed(2))
        for w in works:
            w.work.wait()
        for seed in range(3, 5):
            assert_bytes_equal(sgl_pp.recv_tensor_dict(), mixed(seed))
    else:  # three messages claimed before any wait, waited in reverse
        posted = [ours.irecv_tensor_dict(0, channel=Channel.SGLANG) for _ in range(3)]
        for _, handles, post in reversed(posted):
            wait_all(handles, post)
        for seed, (got, _, _) in enumerate(posted):
            assert_bytes_equal(got, mixed(seed))
        for seed in range(3, 5):
            for w in ours.isend_tensor_dict(
                mixed(seed, contiguous=False), 0, channel=Channel.SGLANG
            ):
                w.wait(WAIT_S)
    # a patched rank 1 against an unpatched rank 0, both directions
    if rank == 1:
        ps_sglang.patch(route=True)
        works = sgl_pp.send_tensor_dict(mixed(5), async_send=True)
        for w in works:
            w.work.wait()
        assert_bytes_equal(wait_all(*sgl_pp.irecv_tensor_dict()[1:]), mixed(6))
        assert_bytes_equal(sgl_pp.recv_tensor_dict(), mixed(7))
    else:
        assert_bytes_equal(sgl_pp.recv_tensor_dict(), mixed(5))
        sgl_pp.send_tensor_dict(mixed(6))
        sgl_pp.send_tensor_dict(mixed(7))
    return True


@pytest.mark.timeout(120)
def test_sglang_and_pipeserve_exchange_dicts_byte_exact() -> None:
    assert run_ranks(_two_ranks, timeout=90) == {0: True, 1: True}


def split_payload(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(16, 32, generator=g).bfloat16(),  # numel % 2 == 0: split
        "odd": torch.randn(3, 5, generator=g),  # numel 15: whole
        "positions": torch.arange(24),  # split as well: SGLang has no opt-out
        "__msg_type__": "proxy",
    }


def _split_grid(rank: int) -> dict:
    """A receiver that expected a row but got the whole tensor would abort inside gloo, and one that
    expected the whole tensor would hang: correct bytes mean both sides split alike."""
    from pipeserve.distributed import Channel, get_tp_group

    sgl_pp, sgl_tp = sglang_groups(2, 2)
    ours = pipeserve_view(sgl_pp)
    if sgl_pp.rank_in_group == 0:  # stage 0: SGLang sends split, then receives split from stage 1
        sgl_pp.send_tensor_dict(split_payload(0), all_gather_group=sgl_tp)
        assert_bytes_equal(sgl_pp.recv_tensor_dict(all_gather_group=sgl_tp), split_payload(1))
        return {}
    _, handles, post = ours.irecv_tensor_dict(0, get_tp_group(), channel=Channel.SGLANG)
    assert_bytes_equal(wait_all(handles, post), split_payload(0))
    for w in ours.isend_tensor_dict(split_payload(1), 0, get_tp_group(), channel=Channel.SGLANG):
        w.wait(WAIT_S)
    return {}


@pytest.mark.timeout(150)
def test_all_gather_split_pp2_tp2_both_ways() -> None:
    assert run_ranks(_split_grid, pp=2, tp=2, timeout=120) == {r: {} for r in range(4)}


def test_header_bytes_are_sglangs_and_foreign_classes_are_refused(tmp_path) -> None:
    import warnings

    from pipeserve.distributed import Limits
    from pipeserve.distributed.sglang_wire import decode_header, encode_header
    from pipeserve.distributed.wire import ProtocolError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sglang.srt.distributed import parallel_state as ps

    d = mixed(0)
    sglang_header = pickle.dumps(ps._split_tensor_dict(d)[0])
    assert encode_header(d) == sglang_header  # the same bytes SGLang's send_object writes
    rows = decode_header(sglang_header, Limits())
    assert [k for k, _ in rows] == list(d)
    path = tmp_path / "pwned"
    with pytest.raises(ProtocolError, match="SGLang header refers to"):
        decode_header(pickle.dumps([("x", Opener(str(path)))]), Limits())
    assert not path.exists()
    with pytest.raises(ProtocolError, match="limit"):
        decode_header(encode_header({"x": torch.ones(1000)}), Limits(max_message_bytes=100))


class Opener:
    """A pickle that, loaded by plain pickle.loads, creates a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
