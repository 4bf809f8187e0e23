"""The batch descriptor: what stage 0 decided for one microbatch, carried to every later stage
inside the same tensor dict as the proxy tensors, so that no later stage ever decides anything.

It carries indices only (request pool rows, positions, KV slots) and per-request sampling columns,
never the tokens a step reads: stage 0 reads those from its token pool. The one exception is a
request's own tokens when it is (re)admitted (`fill_*`): stage 0 and its TP peers put them in their
token pools, and the last stage gets them only for requests with penalties, which need the history.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Descriptor keys are never TP-split: every TP rank of the next stage needs all of it.
DESCRIPTOR_KEYS = (
    "kind",
    "mb_id",
    "req_ints",
    "req_floats",
    "out_slots",
    "fills",
    "prefixes",
    "mrope",
    "visual",
)
# ... nor are DeepStack features (k, M, H): every stage that holds one of the first k layers adds
# them whole
NO_SPLIT = {k: False for k in (*DESCRIPTOR_KEYS, "deepstack")}
KINDS = ("batch", "keepalive", "shutdown")

# Columns of the per-request tensors.
REQ_INT_COLUMNS = (
    "req_pool_idx",
    "prefix_len",
    "extend_len",
    "sample",  # 1 when this step ends the request's uncached tokens, so its last row is sampled
    "seed",
    "step",  # output index of the token being sampled
    "prompt_len",
    "top_logprobs_num",
    "return_logprob",
    "ban_eos",  # 1 while min_new_tokens forbids an EOS at this step (and EOS would end it)
    "rope_delta",  # a multimodal rotary's position minus the token's (0 without images)
)
REQ_FLOAT_COLUMNS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
INT_COL = {name: i for i, name in enumerate(REQ_INT_COLUMNS)}
FLOAT_COL = {name: i for i, name in enumerate(REQ_FLOAT_COLUMNS)}


@dataclass
class TokenReply:
    """What the last stage returns for a microbatch: per sampled request, in request order, its
    token and, when asked, logprobs. The field names are the keys of the tensor dict on the wire
    (`tensors` / `from_tensors`)."""

    next_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprob_ids: list[list[int]] | None = None  # (S, K): K = the largest top_logprobs_num
    top_logprobs: list[list[float]] | None = None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TokenReply:
        """From host tensors, one conversion per column (not one per row)."""
        return cls(**{k: v.tolist() for k, v in tensors.items()})

    @staticmethod
    def tensors(result: Any) -> dict[str, torch.Tensor]:
        """The tensor dict of a sampler result with these fields (those not None)."""
        fields = TokenReply.__dataclass_fields__
        return {k: v for k in fields if (v := getattr(result, k)) is not None}


TOKEN_IDS = "next_token_ids"  # the one key every token reply has


def penalised(req_floats: np.ndarray) -> np.ndarray:
    """bool (B,): the rows (of REQ_FLOAT_COLUMNS) with a non-default penalty."""
    f = {name: req_floats[:, i] for name, i in FLOAT_COL.items()}
    return (
        (f["repetition_penalty"] != 1)
        | (f["frequency_penalty"] != 0)
        | (f["presence_penalty"] != 0)
    )


def seq_lens(req_ints: np.ndarray) -> np.ndarray:
    """(B,) tokens of each request once this step's are in: where its sampled token goes."""
    return req_ints[:, INT_COL["prefix_len"]] + req_ints[:, INT_COL["extend_len"]]


def sampled_token_places(desc: BatchDescriptor) -> np.ndarray:
    """(2, S) token-pool row and position of each sampled token, in request order."""
    ints = desc.req_ints[desc.sampled()]
    return np.stack([ints[:, INT_COL["req_pool_idx"]], seq_lens(ints)])


@dataclass
class BatchDescriptor:
    kind: str  # "batch", "keepalive" (an idle ring refreshing its waits) or "shutdown"
    mb_id: int
    req_ints: np.ndarray  # (B, len(REQ_INT_COLUMNS)) int64
    req_floats: np.ndarray  # (B, len(REQ_FLOAT_COLUMNS)) float32
    out_slots: np.ndarray  # (N,) int64 KV slot of each new token
    fills: np.ndarray  # (1 + 2F + T,) int64: F, F rows, F lengths, then their T tokens; or empty
    # (1 + 2P + S,) int64, as fills: P rows, P lengths, then the KV slots of their cached prefixes
    # (the prefix cache's), which every stage writes into its slot table; or empty
    prefixes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # images (vision-language models): (3 * N,) the (t, h, w) rotary positions of every new token
    # when some are image tokens of a prompt, else empty; (4 * M,) `VISUAL_ROWS` of the M image
    # tokens among the new ones; the images stage 0 encodes now (`IMAGE_COLUMNS` per image) and
    # their float32 patches, which only stage 0 reads
    mrope: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    visual: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    images: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @classmethod
    def control(cls, kind: str, mb_id: int) -> BatchDescriptor:
        return cls(
            kind,
            mb_id,
            np.zeros((0, len(REQ_INT_COLUMNS)), np.int64),
            np.zeros((0, len(REQ_FLOAT_COLUMNS)), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )

    @property
    def num_reqs(self) -> int:
        return self.req_ints.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.out_slots.shape[0]

    def ints(self, name: str) -> np.ndarray:
        return self.req_ints[:, INT_COL[name]]

    def floats(self, name: str) -> np.ndarray:
        return self.req_floats[:, FLOAT_COL[name]]

    def sampled(self) -> np.ndarray:
        """bool (B,): the requests that sample a token this step."""
        return self.ints("sample").astype(bool)

    def sample_rows(self) -> np.ndarray:
        """Row (token index) of each sampled request's last new token, in request order."""
        ends = np.cumsum(self.ints("extend_len")) - 1
        return ends[self.sampled()]

    def fill_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, lengths, tokens) of the requests whose tokens enter the token pools now."""
        return unpack_fills(self.fills)

    def prefix_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, lengths, slots) of the requests admitted now with a cached prefix."""
        return unpack_fills(self.prefixes)

    def with_fills(self, keep: np.ndarray) -> BatchDescriptor:
        """A copy whose fills are only the rows in `keep`."""
        rows, lens, ids = self.fill_parts()
        starts = np.cumsum(lens) - lens
        chosen = np.isin(rows, keep)
        tokens = [ids[s : s + n] for s, n, c in zip(starts, lens, chosen, strict=True) if c]
        fills = pack_fills(rows[chosen], lens[chosen], tokens)
        return dataclasses.replace(self, fills=fills)

    def for_later_stages(self) -> BatchDescriptor:
        """What stages after the first read: no images to encode; fills (penalty history, for the
        last stage) only of the rows with penalties."""
        if not len(self.fills) and not len(self.images):
            return self
        desc = dataclasses.replace(
            self, images=np.zeros(0, np.int64), pixels=np.zeros(0, np.float32)
        )
        return desc.with_fills(desc.ints("req_pool_idx")[penalised(desc.req_floats)])

    def visual_parts(self) -> np.ndarray:
        """(4, M): `VISUAL_ROWS` of this step's image tokens."""
        return self.visual.reshape(len(VISUAL_ROWS), -1)

    def image_parts(self) -> np.ndarray:
        """(K, len(IMAGE_COLUMNS)): the images stage 0 encodes in this step."""
        return self.images.reshape(-1, len(IMAGE_COLUMNS))

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"kind": self.kind, "mb_id": self.mb_id}
        for name in DESCRIPTOR_KEYS[2:]:
            d[name] = torch.from_numpy(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BatchDescriptor:
        arrays = {name: d[name].numpy() for name in DESCRIPTOR_KEYS[2:]}
        return cls(d["kind"], d["mb_id"], **arrays)

    # ---- as tensors, for stage 0's TP peers (no pickle on the hot path) ---------------------------
    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 tensor, float32 tensor) holding everything; `unpack` reverses it."""
        parts = [getattr(self, name).reshape(-1) for name in _PACKED_INTS]
        head = np.array(
            [KINDS.index(self.kind), self.mb_id, self.num_reqs] + [len(x) for x in parts]
        )
        ints = np.concatenate([head.astype(np.int64), *parts])
        floats = np.concatenate([self.req_floats.reshape(-1), self.pixels.reshape(-1)])
        return torch.from_numpy(ints), torch.from_numpy(floats.astype(np.float32, copy=False))

    @classmethod
    def unpack(cls, ints: torch.Tensor, floats: torch.Tensor) -> BatchDescriptor:
        a = ints.numpy()
        head = 3 + len(_PACKED_INTS)
        kind, mb_id, b = (int(x) for x in a[:3])
        ends = np.cumsum([head, *a[3:head]])
        arrays = {name: a[ends[i] : ends[i + 1]] for i, name in enumerate(_PACKED_INTS)}
        arrays["req_ints"] = arrays["req_ints"].reshape(b, len(REQ_INT_COLUMNS))
        f, nf = floats.numpy(), b * len(REQ_FLOAT_COLUMNS)
        return cls(
            KINDS[kind],
            mb_id,
            req_floats=f[:nf].reshape(b, len(REQ_FLOAT_COLUMNS)),
            pixels=f[nf:],
            **arrays,
        )


# the int64 arrays of a descriptor, in `pack` order
_PACKED_INTS = ("req_ints", "out_slots", "fills", "prefixes", "mrope", "visual", "images")
# an image token among a step's new tokens: its row in the batch, its request's pool row, which
# image of the request and which of that image's tokens it is
VISUAL_ROWS = ("batch_row", "req_pool_idx", "image", "token")
# an image stage 0 encodes in a step: the request's pool row, which image of it, its grid in
# patches, and where its patches start in the descriptor's `pixels` (in patches)
IMAGE_COLUMNS = ("req_pool_idx", "image", "t", "h", "w", "patch_start")


def unpack_fills(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, lengths, values) of a `pack_fills` array."""
    f = int(packed[0]) if len(packed) else 0
    return packed[1 : 1 + f], packed[1 + f : 1 + 2 * f], packed[1 + 2 * f :]


def pack_fills(rows: np.ndarray, lens: np.ndarray, tokens: list) -> np.ndarray:
    if not len(rows):
        return np.zeros(0, np.int64)
    parts = [
        np.array([len(rows)], np.int64),
        np.asarray(rows, np.int64),
        np.asarray(lens, np.int64),
    ]
    return np.concatenate([*parts, *(np.asarray(t, np.int64) for t in tokens)])
