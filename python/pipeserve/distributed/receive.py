"""Receiving one message once its header frame is in: verify, decode, check, plan the receives.

Shared by the inboxes' threads and the synchronous baseline. Every check runs before a buffer is
allocated or a receive is posted, and every failure is a P2PError naming the peer and the channel.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import torch

from pipeserve.distributed.frame import Frame, align, check_tail, inline_view, unpack_frame
from pipeserve.distributed.wire import (
    Channel,
    HeaderEntry,
    MessageKind,
    ProtocolError,
    decode_entries,
    loads_plain,
)
from pipeserve.distributed.work import P2PError

if TYPE_CHECKING:
    from pipeserve.distributed.coordinator import GroupCoordinator
    from pipeserve.distributed.inbox import Incoming

_DECODE_ERRORS = (ProtocolError, pickle.UnpicklingError, ValueError, KeyError, TypeError, EOFError)


def malformed(peer: int, channel: Channel, what: str) -> P2PError:
    return P2PError(f"malformed message from rank {peer} on channel {channel.name}: {what}")


def read_header(
    coord: GroupCoordinator, src: int, channel: Channel, frame_buf: torch.Tensor, expected_seq: int
) -> tuple[Frame, bytes]:
    """Verifies an arrived header frame and receives its tail, if any; returns frame and header."""
    peer = coord.ranks[src]
    try:
        frame = unpack_frame(frame_buf)
    except ProtocolError as e:
        raise malformed(peer, channel, str(e)) from e
    if frame.channel != channel or frame.seq != expected_seq or frame.sender != peer:
        raise P2PError(
            f"protocol desync with rank {peer}: expected message {expected_seq} on channel "
            f"{channel.name}, got message {frame.seq} on channel {frame.channel} from rank "
            f"{frame.sender}"
        )
    if frame.header_len > coord.limits.max_header_bytes:
        limit = coord.limits.max_header_bytes
        raise malformed(peer, channel, f"header of {frame.header_len} bytes, limit {limit}")
    payload = frame.head
    if frame.tail_len:
        tail = torch.empty(frame.tail_len, dtype=torch.uint8)
        coord.post_recv(tail, src, channel, channel.data_tag, "header tail", cpu=True).wait()
        payload += tail.numpy().tobytes()
        try:
            check_tail(frame, payload[len(frame.head) :])
        except ProtocolError as e:
            raise malformed(peer, channel, str(e)) from e
    coord.count_received(src, channel, frame.header_len, header=True)
    return frame, payload


def decode_message(
    coord: GroupCoordinator, kind: MessageKind, payload: bytes, peer: int, channel: Channel
) -> Any:
    """An object message's object, or a tensor dict's header entries; builtin values only."""
    try:
        if kind == MessageKind.OBJECT:
            return loads_plain(payload)
        return decode_entries(payload, coord.limits)
    except _DECODE_ERRORS as e:
        raise malformed(peer, channel, f"undecodable {kind.name.lower()} header: {e}") from e


def plan_receive(
    coord: GroupCoordinator,
    src: int,
    channel: Channel,
    entries: list[HeaderEntry],
    incoming: Incoming,
    frame_buf: torch.Tensor,
    frame: Frame,
) -> list[tuple[str, torch.Tensor, bool]]:
    """Fills `incoming.tensor_dict` (inline tensors view the frame) and returns the receives still
    to post, as (what, buffer, on CPU) in wire order. Checks that both sides agree on every split
    and that the inline entries fill exactly the frame's inline bytes."""
    group = incoming.gather_group
    checked = _check_entries(coord, src, channel, entries, incoming, frame)
    raw = frame_buf.numpy() if frame.inline_len else None
    offset, inline_bytes = frame.inline_offset, 0
    targets = []
    for e, (split, nbytes) in zip(entries, checked, strict=True):
        meta = e.meta
        if meta is None:
            incoming.tensor_dict[e.key] = e.value
            continue
        view = None
        if e.inline:  # the bytes (this rank's row when split) sit in the frame
            view = inline_view(raw, offset, nbytes, meta.dtype)
            offset += align(nbytes)
            inline_bytes += nbytes
            if not split:  # used in place: nothing to allocate or copy
                incoming.tensor_dict[e.key] = view.view(meta.shape)
                continue
        on_cpu = meta.device_type == "cpu"
        full = receive_buffer(incoming.into.get(e.key), e, "cpu" if on_cpu else coord.device)
        target = full.view(-1)
        if split:
            target = target.view(group.world_size, -1)[group.rank_in_group]
            incoming.gathers.append(full)
        if view is not None:
            target.copy_(view)
        elif meta.numel:
            targets.append((f"tensor {e.key!r}", target, on_cpu))
        incoming.tensor_dict[e.key] = full
    if inline_bytes:
        coord.count_received(src, channel, inline_bytes)
    return targets


def _check_entries(
    coord: GroupCoordinator,
    src: int,
    channel: Channel,
    entries: list[HeaderEntry],
    incoming: Incoming,
    frame: Frame,
) -> list[tuple[bool, int]]:
    """Each entry's split, checked against the sender's, and its bytes in the frame (0 when not
    inline); the inline entries must add up to exactly the inline bytes the frame carries."""
    group, keys = incoming.gather_group, incoming.gather_keys
    checked, inline_bytes = [], 0
    for e in entries:
        nbytes = 0
        split = e.meta is not None and coord.should_split(e.key, e.meta.numel, group, keys)
        if e.meta is not None and split != e.split:
            raise P2PError(
                f"tensor {e.key!r} from rank {coord.ranks[src]} on channel {channel.name}: sender "
                f"split={e.split}, receiver split={split} (all_gather_group or all_gather_tensors "
                "differ)"
            )
        if e.inline:
            nbytes = _wire_bytes(e, split, group)
            if not nbytes:
                raise malformed(coord.ranks[src], channel, f"inline tensor {e.key!r} has no bytes")
            inline_bytes += align(nbytes)
        checked.append((split, nbytes))
    if inline_bytes != frame.inline_len:
        what = f"header lists {inline_bytes} inline bytes, frame has {frame.inline_len}"
        raise malformed(coord.ranks[src], channel, what)
    return checked


def _wire_bytes(e: HeaderEntry, split: bool, group: GroupCoordinator | None) -> int:
    """Bytes of `e` on the wire: this rank's row when split, else the whole tensor."""
    return e.meta.nbytes // group.world_size if split else e.meta.nbytes


def receive_buffer(into: torch.Tensor | None, e: HeaderEntry, device: Any) -> torch.Tensor:
    """Where tensor `e` lands: a fresh buffer, or the front of the consumer's `into` buffer (the
    consumer keeps it from being reused while a previous message in it is still read)."""
    if into is None:
        return torch.empty(e.meta.shape, dtype=e.meta.dtype, device=device)
    if (
        into.dtype != e.meta.dtype
        or into.device != torch.device(device)
        or into.numel() < e.meta.numel
    ):
        raise P2PError(
            f"tensor {e.key!r} ({e.meta.dtype}, {tuple(e.meta.shape)}) does not fit its receive "
            f"buffer ({into.dtype}, {tuple(into.shape)} on {into.device})"
        )
    return into.view(-1)[: e.meta.numel].view(e.meta.shape)
