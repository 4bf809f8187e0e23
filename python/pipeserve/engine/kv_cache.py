"""KV cache: per-stage slot pools of one geometry, the request-to-slot table, and stage 0's allocators.

Slot 0 is never handed out: padded positions of a decode batch point at it.
"""

from __future__ import annotations

import numpy as np
import torch


class IndexAllocator:
    """Hands out integers of [first, first + size); the same calls always give the same answers."""

    def __init__(self, size: int, first: int = 0) -> None:
        self.free_list = list(
            range(first + size - 1, first - 1, -1)
        )  # pop() yields the lowest first
        self.size = size

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_list)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_list):
            raise RuntimeError(f"asked for {n} entries, {len(self.free_list)} free")
        return [self.free_list.pop() for _ in range(n)]

    def free(self, items: list[int]) -> None:
        self.free_list.extend(reversed(items))


class KVPool:
    """K and V of this stage's layers: (num_slots + 1, kv_heads, head_dim) each, slot 0 a pad."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots + 1, kv_heads, head_dim)
        self.layers = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_slot(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class ReqToToken:
    """Per request pool index, the KV slot (and token id) of every position; written from the batch
    descriptor on every stage, so no stage keeps request state of its own."""

    def __init__(
        self, max_reqs: int, context_length: int, device: torch.device, keep_token_ids: bool
    ) -> None:
        self.slots = torch.zeros(max_reqs, context_length, dtype=torch.int64, device=device)
        self.token_ids = (
            torch.zeros(max_reqs, context_length, dtype=torch.int64) if keep_token_ids else None
        )

    def write(
        self,
        req_pool_idx: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        out_slots: torch.Tensor,
        input_ids: torch.Tensor,
    ) -> None:
        # numpy: these index vectors are small, and torch's CPU ops cost more per call than numpy's
        lens = np.asarray(extend_lens, dtype=np.int64)
        rows = torch.from_numpy(np.repeat(np.asarray(req_pool_idx, dtype=np.int64), lens))
        # column of each new token: its request's prefix plus its offset among the request's tokens
        offsets = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        cols = torch.from_numpy(np.repeat(np.asarray(prefix_lens, dtype=np.int64), lens) + offsets)
        self.slots[rows.to(self.slots.device), cols.to(self.slots.device)] = out_slots.to(
            self.slots.device, torch.int64
        )
        if self.token_ids is not None:
            self.token_ids[rows, cols] = input_ids.to(torch.int64).cpu()
