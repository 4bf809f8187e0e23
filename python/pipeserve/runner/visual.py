"""Stage 0's encoded images, between the step that encodes them (a request's admission) and the
steps whose new tokens are theirs (chunked prefill may spread an image over several)."""

from __future__ import annotations

import numpy as np
import torch

from pipeserve.model.llama import DecoderForCausalLM, VisualRows
from pipeserve.scheduler.descriptor import IMAGE_COLUMNS, BatchDescriptor

_COL = {name: i for i, name in enumerate(IMAGE_COLUMNS)}


class VisualStore:
    """(request pool row, image) -> its embeddings (T, H) and DeepStack features (k, T, H)."""

    def __init__(
        self, model: DecoderForCausalLM, device: torch.device, one_by_one: bool = False
    ) -> None:
        self.model, self.device = model, device
        # deterministic mode: each image through the tower alone, so that its embeddings do not
        # depend on which images share its step (the tower's projections take every patch as a
        # row: on CUDA the matmul's kernel follows their count; on CPU, MKL's row blocks of 4
        # divide every image's patches, whose grid sides are multiples of the merge size)
        self.one_by_one = one_by_one
        self.encoded: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def forget_rows(self, rows: np.ndarray) -> None:
        """Rows (re)admitted now: whatever an earlier holder of the row left goes."""
        if self.encoded and len(rows):
            gone = set(rows.tolist())
            self.encoded = {k: v for k, v in self.encoded.items() if k[0] not in gone}

    def encode(self, desc: BatchDescriptor) -> None:
        """The step's images, as one batch through the vision tower (one by one if asked)."""
        images = desc.image_parts()
        if not len(images):
            return
        grids = [tuple(int(x) for x in g) for g in images[:, [_COL["t"], _COL["h"], _COL["w"]]]]
        keys = [tuple(k) for k in images[:, [_COL["req_pool_idx"], _COL["image"]]].tolist()]
        tower = self.model.visual
        patches = torch.from_numpy(desc.pixels).view(-1, tower.patch_dim).to(self.device)
        if not self.one_by_one:
            self._encode(patches, grids, keys)
            return
        for part, grid, key in zip(
            patches.split([t * h * w for t, h, w in grids]), grids, keys, strict=True
        ):
            self._encode(part, [grid], [key])

    def _encode(self, patches: torch.Tensor, grids: list[tuple], keys: list[tuple]) -> None:
        tower = self.model.visual
        embeds, deepstack = tower(patches, grids)
        sizes = [t * h * w // tower.merge**2 for t, h, w in grids]
        per_image = embeds.split(sizes)
        stacked = torch.stack(deepstack).split(sizes, dim=1) if deepstack else [None] * len(sizes)
        for key, e, d in zip(keys, per_image, stacked, strict=True):
            self.encoded[key] = (e, d)

    def rows_of(self, desc: BatchDescriptor) -> VisualRows | None:
        """The step's image tokens with their embeddings (and DeepStack features); an image whose
        last token this step takes is dropped."""
        batch_row, row, image, token = desc.visual_parts()
        if not len(batch_row):
            return None
        embeds, deepstack = [], []
        for key in dict.fromkeys(zip(row.tolist(), image.tolist(), strict=True)):
            mine = (row == key[0]) & (image == key[1])
            picked = torch.from_numpy(token[mine]).to(self.device)
            e, d = self.encoded[key]
            embeds.append(e[picked])
            if d is not None:
                deepstack.append(d[:, picked])
            if token[mine].max() == e.shape[0] - 1:
                del self.encoded[key]
        rows = torch.from_numpy(batch_row).to(self.device)
        return VisualRows(
            rows, torch.cat(embeds), torch.cat(deepstack, dim=1) if deepstack else None
        )
