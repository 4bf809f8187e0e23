"""Stage 0's descriptors to its TP peers as tensors over the TP group's gloo group (no pickle on
the hot path): a three-int header (sizes and how many token messages arrived since the last one),
then one int64 and one float32 tensor."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeserve.distributed import GroupCoordinator
from pipeserve.scheduler.descriptor import BatchDescriptor


def send_descriptor(tp: GroupCoordinator, desc: BatchDescriptor, arrived: int) -> None:
    ints, floats = desc.pack()
    head = torch.tensor([ints.numel(), floats.numel(), arrived], dtype=torch.int64)
    for t in (head, ints, floats):
        dist.broadcast(t, src=tp.ranks[0], group=tp.cpu_group)


def receive_descriptor(tp: GroupCoordinator) -> tuple[BatchDescriptor, int]:
    head = torch.empty(3, dtype=torch.int64)
    dist.broadcast(head, src=tp.ranks[0], group=tp.cpu_group)
    ints = torch.empty(int(head[0]), dtype=torch.int64)
    floats = torch.empty(int(head[1]), dtype=torch.float32)
    for t in (ints, floats):
        dist.broadcast(t, src=tp.ranks[0], group=tp.cpu_group)
    return BatchDescriptor.unpack(ints, floats), int(head[2])
