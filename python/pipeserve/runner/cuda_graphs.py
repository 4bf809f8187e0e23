"""CUDA graphs of decode microbatches: one per batch-size bucket, captured at start-up largest
first in one shared memory pool, replayed with the batch copied into static buffers.

A graph holds the slot-table update, stage 0's token-pool read, every layer (the TP all-reduce
included, over NCCL) and on the last stage the logits; sampling stays outside. Pad requests sit on
the pad row and write only the pad slot. Nothing host-side (gloo) is ever captured.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from pipeserve.model.forward_batch import INDEX_ROWS, REQ_ROWS, ROW, ForwardBatch
from pipeserve.scheduler.descriptor import BatchDescriptor

if TYPE_CHECKING:
    from pipeserve.runner.model_runner import ModelRunner

logger = logging.getLogger("pipeserve.graphs")


def buckets(max_bs: int) -> list[int]:
    """Graph batch sizes up to `max_bs`: fine steps where padding would cost the most."""
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128]
    sizes += [*range(160, 257, 32), *range(320, 513, 64), *range(640, max_bs + 1, 128)]
    return sorted({b for b in sizes if b < max_bs} | {max_bs})


class Staging:
    """Pinned host blocks for the replays' index copies, used in turn: a block is written again
    only after the copy that last read it has run (its event; long passed in practice)."""

    def __init__(self, numel: int, depth: int = 8) -> None:
        self.blocks = [torch.zeros(numel, dtype=torch.int64).pin_memory() for _ in range(depth)]
        self.done = [torch.cuda.Event() for _ in range(depth)]
        self.turn = 0

    def take(self) -> torch.Tensor:
        """The next block, free to write."""
        self.done[self.turn].synchronize()
        return self.blocks[self.turn]

    def copied(self) -> None:
        """The copy from the block just taken is enqueued: mark it and move to the next."""
        self.done[self.turn].record()
        self.turn = (self.turn + 1) % len(self.blocks)


ROWS = len(INDEX_ROWS)


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.max_bs = max_bs
        self.sizes = buckets(max_bs)
        device = runner.device
        # bucket bs reads index[: ROWS * bs] as (ROWS, bs) rows (forward_batch.INDEX_ROWS); a
        # replay fills it from pinned memory in one copy
        self.index = torch.zeros(ROWS * max_bs, dtype=torch.int64, device=device)
        hidden = runner.model_cfg.hidden_size
        self.hidden = torch.zeros(max_bs, hidden, dtype=runner.dtype, device=device)
        self.residual = torch.zeros_like(self.hidden)
        self.bucket_of = [next(s for s in self.sizes if s >= b) for b in range(max_bs + 1)]
        self.staging = Staging(ROWS * max_bs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, object] = {}
        self.batches: dict[int, ForwardBatch] = {}  # per bucket: views of the static rows

    def can_run(self, desc: BatchDescriptor) -> bool:
        ext = desc.ints("extend_len")
        return (
            0 < desc.num_reqs <= self.max_bs
            and bool((ext == 1).all())
            and not len(desc.visual)  # image tokens are replaced by their embeddings: eager
            and (not self.runner.ctx.is_last_stage or bool(desc.sampled().all()))
        )

    def _rows(self, bs: int) -> torch.Tensor:
        return self.index[: ROWS * bs].view(ROWS, bs)

    def _static_batch(self, bs: int) -> ForwardBatch:
        rows = self._rows(bs)  # views of the static rows: what the graph reads
        return ForwardBatch.of_rows(rows[: len(REQ_ROWS)], rows[len(REQ_ROWS) :], 1, bs)

    def sample_places(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-pool (row, position) of the sampled tokens of the last replay's B requests."""
        rows = self._rows(self.bucket_of[b])
        return rows[ROW["req_pool_idx"], :b], rows[ROW["seq_lens"], :b]

    def _body(self, fb: ForwardBatch, bs: int) -> object:
        first = self.runner.ctx.is_first_stage
        hidden = None if first else self.hidden[:bs]
        residual = None if first else self.residual[:bs]
        return self.runner.run_model(fb, hidden, residual)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.runner.device)[0]
        self.runner.backend.init_capture(self.max_bs)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            pad, *_ = ForwardBatch.pack(
                [], [], [], [], pad_to=bs, pad_row=self.runner.table.pad_row
            )
            self.index[: ROWS * bs].copy_(torch.from_numpy(pad))
            fb = self.batches[bs] = self._static_batch(bs)
            self.runner.backend.prepare_capture(fb)
            for _ in range(2):  # warm-up: kernel selection, NCCL communicators
                self._body(fb, bs)
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._body(fb, bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.runner.device)
        used = free_before - torch.cuda.mem_get_info(self.runner.device)[0]
        logger.info(
            "captured %d CUDA graphs (batch sizes %s) in %.2fs using %.1f MiB",
            len(self.sizes),
            ",".join(map(str, self.sizes)),
            time.perf_counter() - start,
            used / 2**20,
        )

    def replay(
        self, desc: BatchDescriptor, hidden: torch.Tensor | None, residual: torch.Tensor | None
    ) -> object:
        """Runs `desc` (a decode batch of B requests) through the smallest bucket that holds it;
        returns the outputs' first B rows."""
        b = desc.num_reqs
        bs = self.bucket_of[b]
        block = self.staging.take()
        ForwardBatch.pack_decode_into(
            block.numpy(),
            bs,
            desc.ints("req_pool_idx"),
            desc.ints("prefix_len"),
            desc.out_slots,
            self.runner.table.pad_row,
            desc.ints("rope_delta"),
        )
        self.index[: ROWS * bs].copy_(block[: ROWS * bs], non_blocking=True)
        self.staging.copied()
        if hidden is not None:
            self.hidden[:b].copy_(hidden)
            self.residual[:b].copy_(residual)
        self.runner.backend.prepare_replay(self.batches[bs])
        self.graphs[bs].replay()
        out = self.outputs[bs]
        if isinstance(out, tuple):
            return tuple(t[:b] for t in out)
        return out[:b]
