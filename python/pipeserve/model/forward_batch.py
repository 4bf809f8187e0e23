"""One microbatch as a stage's model sees it: device index tensors, plus the sizes the host knows.

Built from a batch descriptor's index columns with a single host-to-device copy. Nothing here holds
a token value: stage 0 reads its input ids from the token pool at (token_rows, positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# The index rows of a packed batch, by name: (B,) per request, then (N,) per new token. A decode
# batch (N == B) packs them as one (len(INDEX_ROWS), B) block (CUDA graphs replay from it).
REQ_ROWS = ("req_pool_idx", "prefix_lens", "extend_lens", "seq_lens", "extend_start")
TOKEN_ROWS = ("positions", "token_rows", "out_slots", "rope_positions")
INDEX_ROWS = REQ_ROWS + TOKEN_ROWS
ROW = {name: i for i, name in enumerate(INDEX_ROWS)}


@dataclass
class ForwardBatch:
    num_reqs: int  # real requests; the tensors may hold pad requests after them
    num_tokens: int
    max_extend_len: int
    is_decode: bool  # every request has exactly one new token
    req_pool_idx: torch.Tensor  # (B,) int64 row of each request in req_to_token / the token pool
    prefix_lens: torch.Tensor  # (B,) int64 positions cached before this step
    extend_lens: torch.Tensor  # (B,) int64 new tokens
    seq_lens: torch.Tensor  # (B,) int64 prefix + new: keys attended by the last new token
    extend_start: torch.Tensor  # (B,) int64 row of each request's first new token
    positions: torch.Tensor  # (N,) int64
    token_rows: torch.Tensor  # (N,) int64 request pool row of each new token
    out_slots: torch.Tensor  # (N,) int64 KV slot each new token writes
    # (N,) int64 the rotary's position: `positions` plus the request's rope delta (a multimodal
    # rotary's text positions after an image, whose tokens take fewer positions than tokens)
    rope_positions: torch.Tensor
    mrope_positions: torch.Tensor | None = None  # (3, N) a multimodal prefill's (t, h, w) positions
    host_req_pool_idx: np.ndarray | None = None  # (B,) the same columns on the host
    host_prefix_lens: np.ndarray | None = None
    host_extend_lens: np.ndarray | None = None
    attn: Any = None  # the attention backend's metadata, set by prepare_metadata

    @classmethod
    def build(
        cls,
        req_pool_idx: np.ndarray,
        prefix_lens: np.ndarray,
        extend_lens: np.ndarray,
        out_slots: np.ndarray,
        device: torch.device,
        pad_to: int = 0,
        pad_row: int = 0,
        rope_delta: np.ndarray | None = None,
    ) -> ForwardBatch:
        """From host index columns; every derived column is computed on the host and the lot
        crosses to the device in one (pinned, non-blocking) copy. `pad_to` adds one-token pad
        requests on `pad_row`, writing the pad slot 0, up to that many requests (CUDA graphs)."""
        packed, columns, max_extend = cls.pack(
            req_pool_idx, prefix_lens, extend_lens, out_slots, pad_to, pad_row, rope_delta
        )
        b = len(columns[0])
        num_tokens = (len(packed) - len(REQ_ROWS) * b) // len(TOKEN_ROWS)
        num_real = b - max(0, pad_to - len(req_pool_idx))
        fb = cls.of_packed(to_device(packed, device), b, num_tokens, max_extend, num_real)
        fb.host_req_pool_idx, fb.host_prefix_lens, fb.host_extend_lens = columns
        return fb

    @staticmethod
    def pack(
        req_pool_idx: np.ndarray,
        prefix_lens: np.ndarray,
        extend_lens: np.ndarray,
        out_slots: np.ndarray,
        pad_to: int = 0,
        pad_row: int = 0,
        rope_delta: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray], int]:
        """(packed int64 array: the REQ_ROWS columns (B,) then the TOKEN_ROWS columns (N,),
        the padded (req_pool_idx, prefix_lens, extend_lens), the largest extend length)."""
        req_pool_idx, prefix_lens, extend_lens, out_slots = (
            np.asarray(a, dtype=np.int64)
            for a in (req_pool_idx, prefix_lens, extend_lens, out_slots)
        )
        delta = np.zeros(len(req_pool_idx), np.int64) if rope_delta is None else rope_delta
        pad = max(0, pad_to - len(req_pool_idx))
        if pad:
            req_pool_idx = np.concatenate([req_pool_idx, np.full(pad, pad_row, np.int64)])
            prefix_lens = np.concatenate([prefix_lens, np.zeros(pad, np.int64)])
            extend_lens = np.concatenate([extend_lens, np.ones(pad, np.int64)])
            out_slots = np.concatenate([out_slots, np.zeros(pad, np.int64)])
            delta = np.concatenate([delta, np.zeros(pad, np.int64)])
        n = int(extend_lens.sum())
        starts = np.cumsum(extend_lens) - extend_lens
        offsets = np.arange(n, dtype=np.int64) - np.repeat(starts, extend_lens)
        positions = np.repeat(prefix_lens, extend_lens) + offsets
        token_rows = np.repeat(req_pool_idx, extend_lens)
        rope_positions = positions + np.repeat(delta, extend_lens)
        columns = [req_pool_idx, prefix_lens, extend_lens, prefix_lens + extend_lens, starts]
        packed = np.concatenate([*columns, positions, token_rows, out_slots, rope_positions])
        max_extend = int(extend_lens.max()) if len(extend_lens) else 0
        return packed, (req_pool_idx, prefix_lens, extend_lens), max_extend

    @staticmethod
    def pack_decode_into(
        out: np.ndarray,
        bs: int,
        req_pool_idx: np.ndarray,
        prefix_lens: np.ndarray,
        out_slots: np.ndarray,
        pad_row: int,
        rope_delta: np.ndarray | None = None,
    ) -> None:
        """`pack` of a decode batch (one new token per request) padded to `bs` requests, written
        into out[: len(INDEX_ROWS) * bs] as its rows: no temporaries beyond the rows themselves."""
        b, r = len(req_pool_idx), ROW
        rows = out[: len(INDEX_ROWS) * bs].reshape(len(INDEX_ROWS), bs)
        rows[r["req_pool_idx"], :b], rows[r["req_pool_idx"], b:] = req_pool_idx, pad_row
        rows[r["prefix_lens"], :b], rows[r["prefix_lens"], b:] = prefix_lens, 0
        rows[r["extend_lens"]] = 1  # one new token each
        np.add(rows[r["prefix_lens"]], 1, out=rows[r["seq_lens"]])
        rows[r["extend_start"]] = np.arange(bs)  # its one token's row = its index
        rows[r["positions"]] = rows[r["prefix_lens"]]
        rows[r["token_rows"]] = rows[r["req_pool_idx"]]
        rows[r["out_slots"], :b], rows[r["out_slots"], b:] = out_slots, 0
        rows[r["rope_positions"]] = rows[r["positions"]]
        if rope_delta is not None:
            rows[r["rope_positions"], :b] += rope_delta

    @classmethod
    def of_packed(
        cls, packed: torch.Tensor, b: int, n: int, max_extend_len: int, num_real: int | None = None
    ) -> ForwardBatch:
        """Views of a packed index tensor: the REQ_ROWS (B,), then the TOKEN_ROWS (N,)."""
        nr, nt = len(REQ_ROWS), len(TOKEN_ROWS)
        per_req, per_token = (
            packed[: nr * b].view(nr, b),
            packed[nr * b : nr * b + nt * n].view(nt, n),
        )
        return cls.of_rows(per_req, per_token, max_extend_len, b if num_real is None else num_real)

    @classmethod
    def of_rows(
        cls, per_req: torch.Tensor, per_token: torch.Tensor, max_extend_len: int, num_real: int
    ) -> ForwardBatch:
        """From the REQ_ROWS (len(REQ_ROWS), B) and the TOKEN_ROWS (len(TOKEN_ROWS), N); views,
        never copies."""
        b = per_req.shape[1]
        return cls(
            num_reqs=num_real,
            num_tokens=per_token.shape[1],
            max_extend_len=max_extend_len,
            is_decode=b > 0 and max_extend_len == 1,
            **{name: per_req[i] for i, name in enumerate(REQ_ROWS)},
            **{name: per_token[i] for i, name in enumerate(TOKEN_ROWS)},
        )


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without blocking the host: pinned staging, non-blocking copy
    (the caching host allocator keeps the staging block until the copy has run)."""
    if device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(array))
    return pinned(array).to(device, non_blocking=True)


def pinned(array: np.ndarray) -> torch.Tensor:
    """A pinned host copy of `array`, for a non-blocking copy to the device."""
    return torch.from_numpy(np.ascontiguousarray(array)).pin_memory()
