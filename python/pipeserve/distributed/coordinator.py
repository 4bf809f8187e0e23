"""GroupCoordinator: a set of ranks with a device group and a CPU group, and the tensor-dict P2P calls."""

from __future__ import annotations

import os
import pickle
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeserve.distributed import sglang_wire
from pipeserve.distributed.frame import FRAME_BYTES, pack_frame
from pipeserve.distributed.inbox import Inbox, MessageWork, make_postprocess
from pipeserve.distributed.send_plan import SendPlan, check_header_size, plan_send, should_split
from pipeserve.distributed.sglang_wire import SGLangLink, gather_rows
from pipeserve.distributed.wire import (
    Channel,
    Limits,
    MessageKind,
    check_object,
    loads_plain,
)
from pipeserve.distributed.work import Endpoint, P2PError, P2PTimeoutError, P2PWork


def default_timeout_s() -> float:
    """PIPESERVE_P2P_TIMEOUT (seconds, default 60): the bound of P2P waits for callers that give
    none. Read when a group is made, never at import (this package depends on nothing else of
    pipeserve, so it reads its one variable itself)."""
    text = os.environ.get("PIPESERVE_P2P_TIMEOUT", "60")
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"PIPESERVE_P2P_TIMEOUT must be a number of seconds, got {text!r}"
        ) from None


DEFAULT_HEADER_TIMEOUT_S = 24 * 3600.0

TensorDict = dict[str, Any]
Postprocess = Callable[[], TensorDict]


@dataclass
class TransferStats:
    """Bytes moved, per (peer global rank, channel name): tensor payload (inline or not, one TP row
    when split) and header bytes (frame prefix, header and tail) apart."""

    sent: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    received: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    header_sent: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    header_received: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))

    def total_sent(self, channel: Channel | None = None) -> int:
        return sum(v for (_, ch), v in self.sent.items() if channel is None or ch == channel.name)

    def total_received(self, channel: Channel | None = None) -> int:
        return sum(
            v for (_, ch), v in self.received.items() if channel is None or ch == channel.name
        )


class GroupCoordinator:
    """Ranks `ranks` (global), this process being `ranks[rank_in_group]`.

    `device_group` carries device tensors (NCCL on CUDA; per channel, so that channels never share an
    ordering), `cpu_group` (gloo) carries headers and CPU tensors, with one tag pair per channel.
    """

    def __init__(
        self,
        ranks: list[int],
        cpu_group: Any,
        device_groups: dict[Channel, Any] | None,
        device: torch.device,
        name: str,
        timeout_s: float | None = None,  # None: default_timeout_s()
        compute_group: Any = None,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        limits: Limits | None = None,
    ) -> None:
        self.ranks = list(ranks)
        self.rank = dist.get_rank()
        self.rank_in_group = self.ranks.index(self.rank)
        self.world_size = len(self.ranks)
        self.cpu_group = cpu_group
        self.device_groups = device_groups or {}
        self.compute_group = compute_group or cpu_group  # the forward's CPU collectives
        self.device = device
        self.name = name
        # default bound of every consumer wait
        self.timeout_s = default_timeout_s() if timeout_s is None else timeout_s
        self.header_timeout_s = (
            header_timeout_s  # receiver threads' bound while a claim is outstanding
        )
        self.limits = limits or Limits()  # what this rank's receivers accept from a header
        self.stats = TransferStats()
        self._sglang: SGLangLink | None = None
        self._inboxes: dict[tuple[int, Channel], Inbox] = {}
        self._send_seq: dict[tuple[int, Channel], int] = defaultdict(int)
        self._sync_recv_seq: dict[tuple[int, Channel], int] = defaultdict(int)

    # ---- topology -------------------------------------------------------------------------------
    @property
    def next_rank(self) -> int:
        """Rank in group of the next member; the last member's next wraps to the first."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank_in_group - 1) % self.world_size

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    def device_group(self, channel: Channel = Channel.PROXY) -> Any:
        return self.device_groups.get(channel, self.cpu_group)

    # ---- raw posting ----------------------------------------------------------------------------
    def _group_for(self, channel: Channel, cpu: bool) -> Any:
        return self.cpu_group if cpu else self.device_group(channel)

    def post_send(
        self, tensor: torch.Tensor, dst: int, channel: Channel, tag: int, what: str, cpu: bool
    ) -> P2PWork:
        peer = self.ranks[dst]
        if tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
        endpoint = Endpoint(peer, channel, what, "send")
        # NOTE: the process group's own send/recv: dist.isend's Python checks cost 4x the post itself.
        # Every group is built over `ranks` in ascending order, so its group rank of ranks[i] is i.
        try:
            work = self._group_for(channel, cpu).send([tensor], dst, tag)
        except RuntimeError as e:
            raise P2PError(f"{endpoint.describe()} could not be posted: {_first_line(e)}") from e
        return P2PWork(work, tensor, endpoint, self.timeout_s)

    def count_received(self, src: int, channel: Channel, nbytes: int, header: bool = False) -> None:
        table = self.stats.header_received if header else self.stats.received
        table[(self.ranks[src], channel.name)] += nbytes

    def post_recv(
        self, tensor: torch.Tensor, src: int, channel: Channel, tag: int, what: str, cpu: bool
    ) -> P2PWork:
        endpoint = Endpoint(self.ranks[src], channel, what, "receive")
        try:
            work = self._group_for(channel, cpu).recv([tensor], src, tag)
        except RuntimeError as e:
            raise P2PError(f"{endpoint.describe()} could not be posted: {_first_line(e)}") from e
        return P2PWork(work, tensor, endpoint, self.timeout_s)

    def _next_seq(self, dst: int, channel: Channel) -> int:
        seq = self._send_seq[(dst, channel)]
        self._send_seq[(dst, channel)] = seq + 1
        return seq

    def post_header(
        self,
        dst: int,
        channel: Channel,
        kind: MessageKind,
        header: bytes,
        inline: list[torch.Tensor] = (),
    ) -> list[P2PWork]:
        check_header_size(len(header), self.limits)
        seq = self._next_seq(dst, channel)
        frame, tail = pack_frame(channel, kind, seq, self.rank, header, list(inline))
        assert frame.numel() <= FRAME_BYTES  # a longer frame would abort the receiver inside gloo
        works = [self.post_send(frame, dst, channel, channel.header_tag, "header", cpu=True)]
        if tail is not None:
            works.append(
                self.post_send(tail, dst, channel, channel.data_tag, "header tail", cpu=True)
            )
        inline_bytes = sum(t.numel() * t.element_size() for t in inline)
        key = (self.ranks[dst], channel.name)
        self.stats.header_sent[key] += sum(w.nbytes for w in works) - inline_bytes
        self.stats.sent[key] += inline_bytes
        return works

    def next_sync_recv_seq(self, src: int, channel: Channel) -> int:
        """Sequence numbers of the synchronous baseline's receives (it bypasses the inboxes)."""
        seq = self._sync_recv_seq[(src, channel)]
        self._sync_recv_seq[(src, channel)] = seq + 1
        return seq

    @property
    def sglang_link(self) -> SGLangLink:
        """This group's channel to SGLang peers: tag 0 of `cpu_group`, device tensors on the
        SGLANG device group when there is one."""
        if self._sglang is None:
            self._sglang = SGLangLink(
                self.ranks,
                self.rank_in_group,
                self.cpu_group,
                self.device_groups.get(Channel.SGLANG),
                self.device,
                name=self.name,
                timeout_s=self.timeout_s,
                header_timeout_s=self.header_timeout_s,
                limits=self.limits,
            )
        return self._sglang

    def _inbox(self, src: int, channel: Channel) -> Inbox:
        key = (src, channel)
        if key not in self._inboxes:
            self._inboxes[key] = Inbox(self, src, channel)
        return self._inboxes[key]

    # ---- tensor dicts ---------------------------------------------------------------------------
    should_split = staticmethod(should_split)

    def isend_tensor_dict(
        self,
        tensor_dict: TensorDict,
        dst: int | None = None,
        all_gather_group: GroupCoordinator | None = None,
        all_gather_tensors: dict[str, bool] | None = None,
        channel: Channel = Channel.PROXY,
        inline: bool = True,
    ) -> list[P2PWork]:
        """Posts the header and every tensor; waits on nothing. Validates before anything is sent.
        `inline=False` sends every tensor separately (the synchronous baseline's wire).
        `channel=Channel.SGLANG` writes SGLang's wire instead (sglang_wire.py), which has no opt-out."""
        dst = self.next_rank if dst is None else dst
        if channel is Channel.SGLANG:
            if all_gather_tensors:
                raise ValueError("SGLang's wire splits by shape alone: no all_gather_tensors")
            return sglang_wire.isend(self.sglang_link, tensor_dict, dst, all_gather_group)
        plan = self.plan_send(tensor_dict, all_gather_group, all_gather_tensors, inline)
        device_keys = [key for key, flat in plan.out_of_line if not flat.is_cpu]
        if device_keys and channel not in self.device_groups:
            raise TypeError(
                f"tensor {device_keys[0]!r} is on {self.device}, but channel {channel.name} has no "
                f"device (NCCL) group; device tensors travel on {', '.join(c.name for c in self.device_groups) or 'no channel of this group'}"
            )
        works = self.post_header(dst, channel, MessageKind.TENSOR_DICT, plan.header, plan.inline)
        for key, flat in plan.out_of_line:
            works.append(
                self.post_send(
                    flat, dst, channel, channel.data_tag, f"tensor {key!r}", cpu=not flat.is_cuda
                )
            )
            self.stats.sent[(self.ranks[dst], channel.name)] += works[-1].nbytes
        return works

    def plan_send(
        self,
        tensor_dict: TensorDict,
        group: GroupCoordinator | None,
        keys: dict[str, bool] | None,
        inline: bool = True,
    ) -> SendPlan:
        """Validates the dict (TypeError or ValueError before the wire); decides split and inline."""
        return plan_send(tensor_dict, group, keys, self.limits, inline)

    def irecv_tensor_dict(
        self,
        src: int | None = None,
        all_gather_group: GroupCoordinator | None = None,
        all_gather_tensors: dict[str, bool] | None = None,
        channel: Channel = Channel.PROXY,
        into: dict[str, torch.Tensor] | None = None,
    ) -> tuple[TensorDict, list[Any], Postprocess]:
        """Claims the next message from `src` and posts every receive it can; blocks on nothing.

        The returned dict fills in once the handles have been waited; `postprocess()` then all-gathers
        the TP-split tensors and returns it. `into` names preallocated buffers (contiguous, at least
        as large, same dtype and device) that receive those keys' tensors instead of fresh ones; the
        tensors returned are views of their fronts. A buffer read on another stream than the
        receive's needs `record_stream` for that stream, as any received tensor does.
        """
        src = self.prev_rank if src is None else src
        if channel is Channel.SGLANG:
            inbox = self.sglang_link.inbox(src)
            incoming = inbox.claim(all_gather_group, None)
            work = MessageWork(inbox, incoming, MessageKind.TENSOR_DICT)
            return incoming.tensor_dict, [work], make_postprocess(incoming, gather_rows)
        inbox = self._inbox(src, channel)
        incoming = inbox.claim(all_gather_group, all_gather_tensors, into)
        handles: list[Any] = [MessageWork(inbox, incoming, MessageKind.TENSOR_DICT)]
        return incoming.tensor_dict, handles, make_postprocess(incoming)

    def send_tensor_dict(
        self, tensor_dict: TensorDict, dst: int | None = None, **kwargs: Any
    ) -> None:
        for w in self.isend_tensor_dict(tensor_dict, dst, **kwargs):
            w.wait()

    def recv_tensor_dict(
        self, src: int | None = None, timeout: float | None = None, **kwargs: Any
    ) -> TensorDict:
        """A wait that times out hands its message to the next receive of that (src, channel)."""
        _, handles, postprocess = self.irecv_tensor_dict(src, **kwargs)
        try:
            handles[0].wait(timeout)
        except P2PTimeoutError:
            handles[0].abandon()
            raise
        return postprocess()

    # ---- objects --------------------------------------------------------------------------------
    def send_object(
        self, obj: Any, dst: int | None = None, channel: Channel = Channel.OBJECT
    ) -> None:
        """`obj` is built of plain values and dicts (TypeError otherwise, before the wire)."""
        check_object(obj)
        dst = self.next_rank if dst is None else dst
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        for w in self.post_header(dst, channel, MessageKind.OBJECT, payload):
            w.wait()

    def recv_object(
        self,
        src: int | None = None,
        channel: Channel = Channel.OBJECT,
        timeout: float | None = None,
    ) -> Any:
        src = self.prev_rank if src is None else src
        inbox = self._inbox(src, channel)
        incoming = inbox.claim(None, None, None, MessageKind.OBJECT)
        work = MessageWork(inbox, incoming, MessageKind.OBJECT)
        try:
            work.wait(timeout)
        except P2PTimeoutError:
            work.abandon()
            raise
        return incoming.obj

    # ---- collectives used by TP layers and postprocess ----------------------------------------------
    def _collective_group(self, tensor: torch.Tensor) -> Any:
        return self.compute_group if tensor.device.type == "cpu" else self.device_group()

    def all_reduce(
        self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM
    ) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op, group=self._collective_group(tensor))
        return tensor

    def all_gather_rows(self, full: torch.Tensor) -> None:
        """In place: row r of `full.view(world, -1)` holds this rank's part; fill in the others."""
        rows = full.view(self.world_size, -1)
        mine = rows[self.rank_in_group].clone()
        dist.all_gather(list(rows.unbind(0)), mine, group=self._collective_group(full))

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's `tensor` along `dim`."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._collective_group(tensor))
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank; plain values and dicts only (decoded by loads_plain)."""
        if self.world_size == 1:
            return obj
        size = torch.zeros(1, dtype=torch.int64)
        if self.rank_in_group == src:
            check_object(obj)
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size[0] = data.numel()
        dist.broadcast(size, src=self.ranks[src], group=self.cpu_group)
        if self.rank_in_group != src:
            if int(size) > self.limits.max_header_bytes:
                raise P2PError(f"rank {self.ranks[src]} broadcasts an object of {int(size)} bytes")
            data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, src=self.ranks[src], group=self.cpu_group)
        return obj if self.rank_in_group == src else loads_plain(data.numpy().tobytes())

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]
