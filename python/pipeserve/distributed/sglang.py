"""pipeserve's asynchronous tensor-dict receive for SGLang's own GroupCoordinator, on SGLang's wire.

    import pipeserve.distributed.sglang as ps_sglang
    ps_sglang.patch()              # adds isend_tensor_dict / irecv_tensor_dict
    ps_sglang.patch(route=True)    # and routes send_tensor_dict / recv_tensor_dict through them

A patched rank and an unpatched SGLang rank talk to each other: the bytes on the wire are SGLang's
(sglang_wire.py). What changes is the receive: the header is read by a thread as soon as a message
is claimed and every tensor receive is posted at once, instead of one wait per tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeserve.distributed.inbox import MessageWork, make_postprocess
from pipeserve.distributed.sglang_wire import SGLangLink, gather_rows, isend
from pipeserve.distributed.wire import MessageKind

_ORIGINAL: dict[str, Any] = {}  # GroupCoordinator's own methods, while patched
_LINK = "_pipeserve_sglang_link"


def _coordinator_class() -> Any:
    from sglang.srt.distributed.parallel_state import GroupCoordinator

    return GroupCoordinator


def link_of(coord: Any) -> SGLangLink:
    """The link of an SGLang GroupCoordinator, made once and kept on it."""
    link = getattr(coord, _LINK, None)
    if link is None:
        link = SGLangLink(
            list(coord.ranks),
            coord.rank_in_group,
            coord.cpu_group,
            coord.device_group,
            torch.device(coord.device),
            name=getattr(coord, "unique_name", "sglang"),
        )
        setattr(coord, _LINK, link)
    return link


def isend_tensor_dict(
    self: Any,
    tensor_dict: dict[str, Any],
    dst: int | None = None,
    all_gather_group: Any = None,
) -> list[Any]:
    """Posts the dict; returns SGLang `P2PWork`s (`.work.wait()`), as `send_tensor_dict(async_send=
    True)` does. Sent device tensors get `record_stream` on the current stream."""
    from sglang.srt.distributed.parallel_state import P2PWork

    dst = (self.rank_in_group + 1) % self.world_size if dst is None else dst
    return [P2PWork(w, w.buffer) for w in isend(link_of(self), tensor_dict, dst, all_gather_group)]


def irecv_tensor_dict(
    self: Any, src: int | None = None, all_gather_group: Any = None
) -> tuple[dict[str, Any], list[MessageWork], Any]:
    """Claims the next message from `src`; returns (dict, handles, postprocess). The dict fills in
    once every handle has been waited; `postprocess()` then all-gathers split tensors and returns
    it. A received device tensor read on another stream needs `record_stream` for that stream."""
    src = (self.rank_in_group - 1) % self.world_size if src is None else src
    inbox = link_of(self).inbox(src)
    incoming = inbox.claim(all_gather_group, None)
    work = MessageWork(inbox, incoming, MessageKind.TENSOR_DICT)
    return incoming.tensor_dict, [work], make_postprocess(incoming, gather_rows)


def _send_tensor_dict(
    self: Any,
    tensor_dict: dict[str, Any],
    dst: int | None = None,
    all_gather_group: Any = None,
    async_send: bool = False,
) -> Any:
    if self.world_size == 1:
        return tensor_dict  # as SGLang does
    works = self.isend_tensor_dict(tensor_dict, dst, all_gather_group)
    if async_send:
        return works
    for w in works:
        w.work.wait()
    return []


def _recv_tensor_dict(
    self: Any, src: int | None = None, all_gather_group: Any = None
) -> dict[str, Any] | None:
    if self.world_size == 1:
        return None  # as SGLang does
    _, handles, postprocess = self.irecv_tensor_dict(src, all_gather_group)
    for h in handles:
        h.wait()
    return postprocess()


def patch(route: bool = False) -> None:
    """Adds `isend_tensor_dict` / `irecv_tensor_dict` to SGLang's GroupCoordinator; with `route`,
    its `send_tensor_dict` / `recv_tensor_dict` go through them. Patch every rank of a stage alike
    (or none): the all-gather of split tensors is a collective of the receiving stage."""
    cls = _coordinator_class()
    unpatch()
    methods = {"isend_tensor_dict": isend_tensor_dict, "irecv_tensor_dict": irecv_tensor_dict}
    if route:
        methods.update(send_tensor_dict=_send_tensor_dict, recv_tensor_dict=_recv_tensor_dict)
    for name, fn in methods.items():
        _ORIGINAL[name] = cls.__dict__.get(name)
        setattr(cls, name, fn)


def unpatch() -> None:
    """Restores SGLang's GroupCoordinator as it was before `patch`."""
    cls = _coordinator_class()
    for name, original in _ORIGINAL.items():
        if original is None:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    _ORIGINAL.clear()
