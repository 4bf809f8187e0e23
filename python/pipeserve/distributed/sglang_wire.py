"""SGLang's tensor-dict wire, sent and received by pipeserve's asynchronous machinery.

The wire of SGLang 0.5.x's `GroupCoordinator.send_tensor_dict`, everything on tag 0 of the group:
an int64 byte count and a uint8 pickle of `[(key, TensorMetadata(device, dtype, size)) or (key,
value)]` on the CPU (gloo) group, then each non-empty tensor in dict order (CPU tensors on the CPU
group, device tensors on the device group). With an all-gather group of size T and `numel % T == 0`
only row `t.reshape(T, -1)[r]` travels and the receiver all-gathers; nothing on the wire says so,
both sides apply the rule.

Here the receive is asynchronous: an inbox thread reads the header as soon as a message is claimed
and posts every tensor receive at once, so the transfer overlaps the consumer's compute. The header
is decoded by an unpickler that admits exactly the classes SGLang's header holds (its
`TensorMetadata`, `torch.Size`, torch dtypes), and checked against `Limits` before allocation.

NOTE: gloo matches receives to sends in posting order per (peer, tag): a (peer, group) spoken to
through this wire must not also be read by SGLang's own `recv_object` / `recv_tensor_dict`.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeserve.distributed.inbox import Inbox, Incoming
from pipeserve.distributed.receive import malformed
from pipeserve.distributed.wire import Channel, Limits, MessageKind, ProtocolError, check_plain
from pipeserve.distributed.work import Endpoint, P2PError, P2PWork

SGLANG_MODULE = "sglang.srt.distributed.parallel_state"
TensorMetadata = namedtuple("TensorMetadata", ["device", "dtype", "size"])  # SGLang's, by value
_SIZE = 8  # bytes of the int64 header length


@dataclass
class SGLangLink:
    """The process groups a GroupCoordinator (pipeserve's or SGLang's) speaks SGLang's wire over.
    `ranks` are global ranks in group order."""

    ranks: list[int]
    rank_in_group: int
    cpu_group: Any
    device_group: Any  # None: device tensors cannot travel
    device: torch.device
    name: str = "sglang"
    timeout_s: float = 2 * 3600.0  # consumer waits; SGLang's gloo groups' own timeout
    header_timeout_s: float = 24 * 3600.0
    limits: Limits = field(default_factory=Limits)
    inboxes: dict[int, SGLangInbox] = field(default_factory=dict)

    def post(self, tensor: torch.Tensor, peer: int, what: str, send: bool) -> P2PWork:
        """Posts a send or receive of `tensor` with group member `peer` on tag 0."""
        group = self.cpu_group if tensor.is_cpu else self.device_group
        endpoint = Endpoint(self.ranks[peer], Channel.SGLANG, what, "send" if send else "receive")
        if group is None:
            raise P2PError(f"{endpoint.describe()}: no device group for {tensor.device} tensors")
        if send and tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
        try:
            group_rank = dist.get_group_rank(group, self.ranks[peer])
            post = group.send if send else group.recv
            work = post([tensor], group_rank, Channel.SGLANG.header_tag)
        except RuntimeError as e:
            raise P2PError(f"{endpoint.describe()} could not be posted: {e}") from e
        return P2PWork(work, tensor, endpoint, self.timeout_s)

    def inbox(self, src: int) -> SGLangInbox:
        if src not in self.inboxes:
            self.inboxes[src] = SGLangInbox(self, src)  # type: ignore[arg-type]
        return self.inboxes[src]


# ---- header codec ---------------------------------------------------------------------------
class _Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes `TensorMetadata` under SGLang's class path without importing SGLang."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is not TensorMetadata:
            super().save_global(obj, name)
            return
        self.save(SGLANG_MODULE)
        self.save("TensorMetadata")
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


class _Unpickler(pickle.Unpickler):
    """Admits SGLang's TensorMetadata, torch.Size and torch dtypes; every other class is an error."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (SGLANG_MODULE, "TensorMetadata"):
            return TensorMetadata
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise ProtocolError(f"SGLang header refers to {module}.{name}")


def encode_header(tensor_dict: dict[str, Any]) -> bytes:
    rows: list[tuple[str, Any]] = []
    for key, value in tensor_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor dict keys must be str, got {type(key).__name__}")
        if isinstance(value, torch.Tensor):
            rows.append((key, TensorMetadata(value.device.type, value.dtype, value.size())))
        else:
            check_plain(key, value)
            rows.append((key, value))
    out = io.BytesIO()
    _Pickler(out, protocol=4).dump(rows)
    return out.getvalue()


def decode_header(payload: bytes, limits: Limits) -> list[tuple[str, Any]]:
    rows = _Unpickler(io.BytesIO(payload)).load()
    if not isinstance(rows, list) or not all(
        isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in rows
    ):
        raise ProtocolError("an SGLang header is a list of (key, value) pairs")
    total = 0
    for key, value in rows:
        if isinstance(value, TensorMetadata):
            total += _check_meta(key, value)
    if total > limits.max_message_bytes:
        raise ProtocolError(
            f"header declares {total} tensor bytes, limit {limits.max_message_bytes}"
        )
    return rows


def _check_meta(key: str, meta: TensorMetadata) -> int:
    """The tensor's bytes; raises ProtocolError for an impossible tensor."""
    shape = meta.size
    if meta.device not in ("cpu", "cuda") or not isinstance(meta.dtype, torch.dtype):
        raise ProtocolError(f"tensor {key!r} has device {meta.device!r}, dtype {meta.dtype!r}")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"tensor {key!r} has an impossible shape {shape!r:.80}")
    return math.prod(shape) * meta.dtype.itemsize


def split_row(numel: int, group: Any) -> bool:
    """SGLang's rule: with an all-gather group, a tensor whose numel it divides travels split."""
    return group is not None and numel % group.world_size == 0


# ---- sending ----------------------------------------------------------------------------------
def isend(
    link: SGLangLink, tensor_dict: dict[str, Any], dst: int, gather_group: Any
) -> list[P2PWork]:
    """Posts SGLang's header and every non-empty tensor; waits on nothing."""
    payload = encode_header(tensor_dict)
    if len(payload) > link.limits.max_header_bytes:
        raise ValueError(f"header of {len(payload)} bytes, limit {link.limits.max_header_bytes}")
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    works = [link.post(size, dst, "header size", True), link.post(data, dst, "header", True)]
    for key, value in tensor_dict.items():
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        flat = value.contiguous()
        if split_row(flat.numel(), gather_group):
            flat = flat.reshape(gather_group.world_size, -1)[gather_group.rank_in_group]
        works.append(link.post(flat, dst, f"tensor {key!r}", True))
    return works


# ---- receiving --------------------------------------------------------------------------------
class SGLangInbox(Inbox):
    """Receives SGLang messages from one peer; nothing is posted before a message is claimed."""

    def __init__(self, link: SGLangLink, src: int) -> None:
        super().__init__(link, src, Channel.SGLANG)  # type: ignore[arg-type]

    def _post_ahead(self) -> None:
        pass

    def _begin(self, incoming: Incoming) -> None:
        pass

    def _receive(self, incoming: Incoming) -> None:
        link: SGLangLink = self.coord  # type: ignore[assignment]
        size = torch.empty(1, dtype=torch.int64)
        link.post(size, self.src, "header size", False).wait(link.header_timeout_s)
        with self.cond:
            incoming.committed = True
        incoming.kind = MessageKind.TENSOR_DICT
        rows = self._read_header(link, int(size))
        works = [
            link.post(t, self.src, what, False) for what, t in self._plan(link, rows, incoming)
        ]
        for w in works:
            if w.buffer.is_cpu:
                w.wait()
            else:  # waited by the consumer, on its own stream
                incoming.device_works.append(w)

    def _read_header(self, link: SGLangLink, nbytes: int) -> list[tuple[str, Any]]:
        if not 0 < nbytes <= link.limits.max_header_bytes:
            raise malformed(self.peer, self.channel, f"header of {nbytes} bytes")
        payload = torch.empty(nbytes, dtype=torch.uint8)
        link.post(payload, self.src, "header", False).wait()
        try:
            return decode_header(payload.numpy().tobytes(), link.limits)
        except (ProtocolError, pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
            raise malformed(self.peer, self.channel, f"undecodable SGLang header: {e}") from e

    def _plan(
        self, link: SGLangLink, rows: list[tuple[str, Any]], incoming: Incoming
    ) -> list[tuple[str, torch.Tensor]]:
        """Fills `incoming.tensor_dict` and returns the receives to post, in wire order."""
        group, targets = incoming.gather_group, []
        for key, value in rows:
            if not isinstance(value, TensorMetadata):
                incoming.tensor_dict[key] = value
                continue
            device = "cpu" if value.device == "cpu" else link.device
            full = torch.empty(value.size, dtype=value.dtype, device=device)
            incoming.tensor_dict[key] = full
            if full.numel() == 0:
                continue
            target = full.view(-1)
            if split_row(full.numel(), group):
                target = target.view(group.world_size, -1)[group.rank_in_group]
                incoming.gathers.append(full)
            targets.append((f"tensor {key!r}", target))
        return targets


def gather_rows(group: Any, full: torch.Tensor) -> None:
    """Fills in the rows of `full` that the other members of `group` received."""
    if hasattr(group, "all_gather_rows"):  # pipeserve's GroupCoordinator
        group.all_gather_rows(full)
        return
    # SGLang's GroupCoordinator: its own all_gather, so patched and unpatched peers interoperate
    row = full.view(group.world_size, -1)[group.rank_in_group]
    full.copy_(group.all_gather(row.contiguous(), dim=0).view(full.shape))
