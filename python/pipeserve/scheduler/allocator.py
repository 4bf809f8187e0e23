"""Stage 0's allocators of KV slots and request pool rows."""

from __future__ import annotations

import numpy as np


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
