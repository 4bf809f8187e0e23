"""What a sender puts on the wire for one tensor dict: validated entries, inline and out-of-line
tensors. Decided before anything is posted, so a dict that cannot be sent never half-reaches the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeserve.distributed.frame import FRAME_BYTES, align, inline_fits
from pipeserve.distributed.wire import (
    HeaderEntry,
    Limits,
    check_plain,
    encode_entries,
    tensor_meta,
)

if TYPE_CHECKING:
    from pipeserve.distributed.coordinator import GroupCoordinator

INLINE_BUDGET = FRAME_BYTES // 2  # tensor bytes a frame may carry; the rest is left for the header


@dataclass
class SendPlan:
    entries: list[HeaderEntry]
    inline: list[torch.Tensor]  # flat CPU tensors carried in the frame, in entry order
    out_of_line: list[tuple[str, torch.Tensor]]  # (key, flat tensor) sent after the frame, in order
    header: bytes = b""  # encode_entries(entries)


def should_split(
    key: str, numel: int, group: GroupCoordinator | None, keys: dict[str, bool] | None
) -> bool:
    """Both sides decide from shape and group size alone, so they always agree."""
    if group is None or group.world_size == 1 or numel == 0 or numel % group.world_size:
        return False
    return (keys or {}).get(key, True)


def plan_send(
    tensor_dict: dict[str, Any],
    group: GroupCoordinator | None,
    keys: dict[str, bool] | None,
    limits: Limits,
    inline: bool = True,
) -> SendPlan:
    """Validates the dict (TypeError for a key or value that cannot travel, ValueError over the
    limits) and decides, per tensor, TP split and inline. The frame never exceeds FRAME_BYTES: when
    header and inline tensors would not fit together, every tensor goes out of line."""
    plan = SendPlan([], [], [])
    budget = INLINE_BUDGET if inline else 0
    total = 0
    for key, value in tensor_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor dict keys must be str, got {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            check_plain(key, value)
            plan.entries.append(HeaderEntry(key, None, value=value))
            continue
        meta = tensor_meta(key, value)
        nbytes = meta.nbytes  # on the wire: this rank's row when split
        total += nbytes
        split = should_split(key, meta.numel, group, keys)
        flat = value.contiguous().view(-1) if nbytes else None
        if split:
            flat = flat.view(group.world_size, -1)[group.rank_in_group]
            nbytes //= group.world_size
        as_inline = flat is not None and not flat.is_cuda and align(nbytes) <= budget
        if as_inline:
            budget -= align(nbytes)
            plan.inline.append(flat)
        elif flat is not None:
            plan.out_of_line.append((key, flat))
        plan.entries.append(HeaderEntry(key, meta, split, as_inline))
    if total > limits.max_message_bytes:
        raise ValueError(
            f"tensor dict of {total} bytes is over the receivers' limit of "
            f"{limits.max_message_bytes} (max_message_bytes)"
        )
    plan.header = encode_entries(plan.entries)
    if plan.inline and not inline_fits(len(plan.header), INLINE_BUDGET - budget):
        return plan_send(tensor_dict, group, keys, limits, inline=False)
    check_header_size(len(plan.header), limits)
    return plan


def check_header_size(header_len: int, limits: Limits) -> None:
    if header_len > limits.max_header_bytes:
        raise ValueError(
            f"header of {header_len} bytes is over the limit of {limits.max_header_bytes}"
        )
