"""The synchronous baseline: header first, then each tensor received and waited in turn.

This is how SGLang 0.5.x's `recv_tensor_dict` moves a dict. It exists only so that benchmarks can
compare it with the asynchronous path on the same build and the same wire format. Do not mix it with
`irecv_tensor_dict` on one (peer, channel): the asynchronous inbox posts header receives ahead.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeserve.distributed.coordinator import GroupCoordinator
from pipeserve.distributed.frame import FRAME_BYTES
from pipeserve.distributed.inbox import Incoming, check_kind
from pipeserve.distributed.receive import decode_message, plan_receive, read_header
from pipeserve.distributed.wire import Channel, MessageKind


def send_tensor_dict_sync(
    coord: GroupCoordinator,
    tensor_dict: dict[str, Any],
    dst: int | None = None,
    all_gather_group: GroupCoordinator | None = None,
    all_gather_tensors: dict[str, bool] | None = None,
    channel: Channel = Channel.PROXY,
) -> None:
    dst = coord.next_rank if dst is None else dst
    plan = coord.plan_send(tensor_dict, all_gather_group, all_gather_tensors, inline=False)
    for w in coord.post_header(dst, channel, MessageKind.TENSOR_DICT, plan.header):
        w.wait()
    for key, flat in plan.out_of_line:
        work = coord.post_send(
            flat, dst, channel, channel.data_tag, f"tensor {key!r}", cpu=not flat.is_cuda
        )
        work.wait()
        coord.stats.sent[(coord.ranks[dst], channel.name)] += work.nbytes


def recv_tensor_dict_sync(
    coord: GroupCoordinator,
    src: int | None = None,
    all_gather_group: GroupCoordinator | None = None,
    all_gather_tensors: dict[str, bool] | None = None,
    channel: Channel = Channel.PROXY,
    timeout: float | None = None,
) -> dict[str, Any]:
    src = coord.prev_rank if src is None else src
    frame_buf = torch.empty(FRAME_BYTES, dtype=torch.uint8)
    coord.post_recv(frame_buf, src, channel, channel.header_tag, "header", cpu=True).wait(timeout)
    frame, payload = read_header(
        coord, src, channel, frame_buf, coord.next_sync_recv_seq(src, channel)
    )
    check_kind(frame.kind, MessageKind.TENSOR_DICT, coord.ranks[src], channel)
    entries = decode_message(coord, frame.kind, payload, coord.ranks[src], channel)
    dest = Incoming(None, all_gather_group, all_gather_tensors)
    for what, target, on_cpu in plan_receive(coord, src, channel, entries, dest, frame_buf, frame):
        coord.post_recv(target, src, channel, channel.data_tag, what, cpu=on_cpu).wait(timeout)
        coord.count_received(src, channel, target.numel() * target.element_size())
    for full in dest.gathers:
        all_gather_group.all_gather_rows(full)
    return dest.tensor_dict
