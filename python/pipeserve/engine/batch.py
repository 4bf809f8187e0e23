"""The batch descriptor: what stage 0 decided for one microbatch, carried to every later stage
inside the same tensor dict as the proxy tensors, so that no later stage ever decides anything."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Descriptor keys are never TP-split: every TP rank of the next stage needs all of it.
DESCRIPTOR_KEYS = ("kind", "mb_id", "req_ints", "req_floats", "token_ints")
NO_SPLIT = {k: False for k in DESCRIPTOR_KEYS}

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
class BatchDescriptor:
    kind: str  # "batch", "keepalive" or "shutdown"
    mb_id: int
    req_ints: torch.Tensor  # (B, len(REQ_INT_COLUMNS)) int64
    req_floats: torch.Tensor  # (B, len(REQ_FLOAT_COLUMNS)) float32
    token_ints: torch.Tensor  # (N, 2) int64: input id, KV slot of each new token

    @classmethod
    def control(cls, kind: str, mb_id: int) -> BatchDescriptor:
        return cls(
            kind,
            mb_id,
            torch.zeros(0, len(REQ_INT_COLUMNS), dtype=torch.int64),
            torch.zeros(0, len(REQ_FLOAT_COLUMNS)),
            torch.zeros(0, 2, dtype=torch.int64),
        )

    @property
    def num_reqs(self) -> int:
        return self.req_ints.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_ints.shape[0]

    def ints(self, name: str) -> torch.Tensor:
        return self.req_ints[:, INT_COL[name]]

    def floats(self, name: str) -> torch.Tensor:
        return self.req_floats[:, FLOAT_COL[name]]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.token_ints[:, 0]

    @property
    def out_slots(self) -> torch.Tensor:
        return self.token_ints[:, 1]

    def sample_rows(self) -> torch.Tensor:
        """Row (token index) of each sampled request's last new token, in request order."""
        ends = torch.cumsum(self.ints("extend_len"), 0) - 1
        return ends[self.ints("sample").bool()]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "mb_id": self.mb_id,
            "req_ints": self.req_ints,
            "req_floats": self.req_floats,
            "token_ints": self.token_ints,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BatchDescriptor:
        return cls(d["kind"], d["mb_id"], d["req_ints"], d["req_floats"], d["token_ints"])
