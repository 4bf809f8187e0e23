"""KV cache: per-stage slot pools of one geometry and the request-to-slot table.

Slot 0 is never handed out: padded positions of a decode batch point at it.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeserve.model.forward_batch import ForwardBatch, to_device


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
    """Per request pool row, the KV slot of every position: written from the batch descriptor on
    every stage, so no stage keeps request state of its own. The last row is the pad row of
    CUDA-graph padding: it maps every position to the pad slot 0."""

    def __init__(self, max_reqs: int, context_length: int, device: torch.device) -> None:
        self.slots = torch.zeros(max_reqs + 1, context_length + 1, dtype=torch.int32, device=device)
        self.pad_row = max_reqs

    def write(self, batch: ForwardBatch) -> None:
        self.slots[batch.token_rows, batch.positions] = batch.out_slots.to(torch.int32)

    def fill(self, rows: np.ndarray, lens: np.ndarray, slots: np.ndarray) -> None:
        """Row rows[i] maps its first lens[i] positions to `slots` (concatenated): the prefix
        cache's KV of a request admitted with a cached prefix."""
        fill_rows(self.slots, rows, lens, slots)


class TokenPool:
    """Per request pool row, the token id at every position, on the device: stage 0 reads its input
    ids here (so no descriptor carries a token value), the last stage its penalty history. Written
    when a request is (re)admitted (`fill`) and when a sampled token comes back (`write`)."""

    def __init__(self, max_reqs: int, context_length: int, device: torch.device) -> None:
        self.ids = torch.zeros(max_reqs + 1, context_length + 2, dtype=torch.int32, device=device)

    def fill(self, rows: np.ndarray, lens: np.ndarray, ids: np.ndarray) -> None:
        """Row rows[i] gets its first lens[i] tokens from `ids` (concatenated)."""
        fill_rows(self.ids, rows, lens, ids)

    def write(self, rows: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        self.ids[rows, positions] = tokens.to(torch.int32)

    def read(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.ids[rows, positions].to(torch.int64)


def fill_rows(table: torch.Tensor, rows: np.ndarray, lens: np.ndarray, values: np.ndarray) -> None:
    """table[rows[i], :lens[i]] = the next lens[i] of `values`, in one copy to the device."""
    if not len(rows):
        return
    cols = np.arange(len(values), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    packed = to_device(np.concatenate([np.repeat(rows, lens), cols, values]), table.device)
    r, c, v = packed.view(3, -1)
    table[r, c] = v.to(table.dtype)
