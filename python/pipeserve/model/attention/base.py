"""The attention-backend seam: how a stage attends over its paged KV cache.

The runner calls `prepare_metadata` once per eager microbatch; the CUDA-graph runner calls
`init_capture` once, `prepare_capture` before capturing a decode batch of static buffers and
`prepare_replay` before each replay; every layer calls `forward`. Backends register by name.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pipeserve.config import DETERMINISTIC_TORCH_ON_CUDA
from pipeserve.model.forward_batch import ForwardBatch


@dataclass(frozen=True)
class BackendSpec:
    heads: int  # query heads on this rank
    kv_heads: int
    head_dim: int
    max_batch: int  # requests per microbatch at most (the pad row excluded)
    device: torch.device


class AttentionBackend(ABC):
    supports_cuda_graph = False

    def __init__(self, spec: BackendSpec, req_to_token: torch.Tensor) -> None:
        self.spec = spec
        self.req_to_token = req_to_token  # (rows, max_len) KV slot of every position

    @abstractmethod
    def prepare_metadata(self, batch: ForwardBatch) -> None:
        """Sets `batch.attn`; `req_to_token` already holds this batch's new slots."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        """q (N, H, D), k and v (N, Hkv, D) of the new tokens, which the layer has already written
        into the cache at `batch.out_slots` (with the rotary, in one kernel); returns attention
        output (N, H, D)."""

    def init_capture(self, max_batch: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot run inside CUDA graphs")

    def prepare_capture(self, batch: ForwardBatch) -> None:
        """Metadata of a decode batch made of the graph's static buffers."""
        raise NotImplementedError(f"{type(self).__name__} cannot run inside CUDA graphs")

    def prepare_replay(self, batch: ForwardBatch) -> None:
        """Refreshes whatever the captured metadata derives from the static buffers."""
        raise NotImplementedError(f"{type(self).__name__} cannot run inside CUDA graphs")


BACKENDS: dict[str, type[AttentionBackend]] = {}


def register(name: str):
    def deco(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        BACKENDS[name] = cls
        return cls

    return deco


def resolve_backend_name(name: str, device_type: str, deterministic: bool = False) -> str:
    """'auto' is triton on CUDA and torch on CPU; deterministic mode takes the batch-invariant
    variant of either (`torch_invariant`, `triton_invariant`)."""
    if name == "auto":
        name = "triton" if device_type == "cuda" else "torch"
    if name not in ("torch", "triton"):
        raise ValueError(f"attention backend must be auto, torch or triton, got {name!r}")
    if name == "triton" and device_type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        raise ValueError(
            "the triton attention backend runs on CPU only under Triton's interpreter "
            "(TRITON_INTERPRET=1, slow: for tests); use the torch backend on CPU"
        )
    if deterministic and name == "torch" and device_type == "cuda":
        raise ValueError(DETERMINISTIC_TORCH_ON_CUDA)
    return f"{name}_invariant" if deterministic else name


def create_backend(name: str, spec: BackendSpec, req_to_token: torch.Tensor) -> AttentionBackend:
    if name == "triton":  # imported on demand: triton is needed only by this backend
        from pipeserve.model.attention import triton_backend  # noqa: F401
    if name == "torch":
        from pipeserve.model.attention import torch_backend  # noqa: F401
    if name == "torch_invariant":
        from pipeserve.model.attention import torch_invariant  # noqa: F401
    if name == "triton_invariant":
        from pipeserve.model.attention import triton_invariant  # noqa: F401
    return BACKENDS[name](spec, req_to_token)
