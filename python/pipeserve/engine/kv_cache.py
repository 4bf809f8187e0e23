"""KV cache: per-stage slot pools of one geometry, the request-to-slot table, and stage 0's allocators.

Slot 0 is never handed out: padded positions of a decode batch point at it.
"""

from __future__ import annotations

import numpy as np
import torch


class IndexAllocator:
    """Hands out integers of [first, first + size); the same calls always give the same answers.

    A stack in a numpy array (top at the end, the lowest free integer on top at the start): a Python
    list of millions of ints would be walked by every full garbage collection."""

    def __init__(self, size: int, first: int = 0) -> None:
        self.stack = np.arange(first + size - 1, first - 1, -1, dtype=np.int64)
        self.top = size  # stack[:top] are free
        self.size = size

    @property
    def num_free(self) -> int:
        return self.top

    def can_allocate(self, n: int) -> bool:
        return n <= self.top

    def allocate(self, n: int) -> list[int]:
        if n > self.top:
            raise RuntimeError(f"asked for {n} entries, {self.top} free")
        out = self.stack[self.top - n : self.top][::-1].tolist()
        self.top -= n
        return out

    def free(self, items: list[int]) -> None:
        """Frees `items`; the next allocation hands them out again in the same order."""
        if self.top + len(items) > self.size:
            raise RuntimeError(f"freeing {len(items)} entries with {self.size - self.top} in use")
        self.stack[self.top : self.top + len(items)] = items[::-1]
        self.top += len(items)


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
