"""Where a model sits in the PP x TP grid, and the tensor-parallel layers built from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.model import batch_invariant, gemv
from pipeserve.model.fused import add_rmsnorm

if TYPE_CHECKING:
    from pipeserve.distributed import GroupCoordinator


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: GroupCoordinator | None = None
    # deterministic mode: projections reduce every row in one order, whatever shares the batch
    batch_invariant: bool = False

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tp_size == 1 else self.tp_group.all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x if self.tp_size == 1 else self.tp_group.all_gather(x, dim)

    @property
    def projections(self) -> Any:
        """The module whose `linear`, `norm_linear`, `norm_gate_up` and `down_linear` the layers
        call."""
        return batch_invariant if self.batch_invariant else gemv

    def shard(self, size: int, what: str) -> int:
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by tp_size ({self.tp_size})")
        return size // self.tp_size


def _rows(loaded: Any, start: int, length: int) -> torch.Tensor:
    """Rows [start, start + length) of a tensor or a lazy safetensors slice (reads only those)."""
    return loaded[start : start + length]


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's rows split over TP ranks; several projections may be merged
    (`out_sizes`, e.g. q/k/v or gate/up), each split separately."""

    def __init__(
        self, in_features: int, out_sizes: list[int], bias: bool, ctx: ParallelContext, what: str
    ) -> None:
        super().__init__()
        self.ctx, self.ops = ctx, ctx.projections
        self.local_sizes = [ctx.shard(s, f"{what} output size") for s in out_sizes]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(out_sizes))]
        out_local = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(out_local, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None

    def load(self, param: str, loaded: Any, shard: int = 0) -> None:
        n, off = self.local_sizes[shard], self.offsets[shard]
        getattr(self, param).data[off : off + n].copy_(_rows(loaded, self.ctx.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)

    def norm_forward(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual); one kernel at batch 1 on CUDA (gemv)."""
        return self.ops.norm_linear(x, residual, norm.weight, norm.eps, self.weight, self.bias)

    def norm_gate_up_forward(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, inter: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP's hidden of norm(x + residual), x + residual), this being gate | up: the
        hidden in the form that `RowParallelLinear.down_forward` of the same `ops` takes (gate_up,
        or silu(gate) * up already)."""
        w, b = self.weight, self.bias
        return self.ops.norm_gate_up(x, residual, norm.weight, norm.eps, w, b, inter)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b with W's columns split over TP ranks."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext, what: str
    ) -> None:
        super().__init__()
        self.ctx, self.ops = ctx, ctx.projections
        self.in_local = ctx.shard(in_features, f"{what} input size")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load(self, param: str, loaded: Any, shard: int = 0) -> None:
        if param == "bias":
            self.bias.data.copy_(loaded[:])
            return
        start = self.ctx.tp_rank * self.in_local
        self.weight.data.copy_(loaded[:, start : start + self.in_local])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(self.ops.linear(x, self.weight))

    def down_forward(self, hidden: torch.Tensor, inter: int) -> torch.Tensor:
        """self(silu(gate) * up) of the MLP's hidden from `norm_gate_up_forward`."""
        return self._reduce(self.ops.down_linear(hidden, inter, self.weight))

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        y = self.ctx.all_reduce(partial)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over TP ranks (the vocabulary padded up to a multiple of tp_size); each
    rank looks up the ids it owns, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.vocab_local = -(-vocab_size // ctx.tp_size)
        self.start = ctx.tp_rank * self.vocab_local
        self.weight = nn.Parameter(torch.empty(self.vocab_local, hidden_size), requires_grad=False)

    def load(self, param: str, loaded: Any, shard: int = 0) -> None:
        n = max(0, min(self.vocab_local, self.vocab_size - self.start))
        self.weight.data.zero_()
        if n:
            self.weight.data[:n].copy_(_rows(loaded, self.start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.vocab_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.ctx.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection: local logits, all-gathered, the padding cut off."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext) -> None:
        super().__init__(vocab_size, hidden_size, ctx)
        self.matmul = batch_invariant.linear if ctx.batch_invariant else F.linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, V)
        logits = self.ctx.all_gather(self.matmul(hidden, self.weight), dim=-1)
        return logits[..., : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def load(self, param: str, loaded: Any, shard: int = 0) -> None:
        self.weight.data.copy_(loaded[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return add_rmsnorm(x.reshape(-1, shape[-1]), None, self.weight, self.eps)[0].view(shape)

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm."""
        return add_rmsnorm(x, residual, self.weight, self.eps)
