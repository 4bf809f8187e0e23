"""Attention backends behind one small interface (see base.py): `torch` (SDPA over gathered K/V;
CPU and fallback) and `triton` (paged kernels over the slot pool; CUDA, or Triton's interpreter)."""

from pipeserve.model.attention.base import (
    BACKENDS,
    AttentionBackend,
    BackendSpec,
    create_backend,
    resolve_backend_name,
)

__all__ = ["BACKENDS", "AttentionBackend", "BackendSpec", "create_backend", "resolve_backend_name"]
