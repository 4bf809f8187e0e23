"""The vision towers of Qwen2.5-VL and Qwen3-VL: image patches in, one embedding per merged
patch out (what replaces an image-pad token's embedding), plus Qwen3-VL's DeepStack features.

Stage 0 holds the tower, whole on every TP rank (it is small next to the language model). A batch
is the patches of several images, one after another (`grid`: (t, h, w) patches each); attention
never crosses an image (Qwen2.5-VL: nor a window, except in its full-attention blocks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Loads:
    """A replicated parameter holder: a checkpoint tensor is copied whole (a 3-D convolution's
    kernel into the linear map it equals, by a reshape)."""

    def load(self, param: str, loaded: Any, shard: int = 0) -> None:
        target = getattr(self, param)
        target.data.copy_(loaded[:].reshape(target.shape))


class Linear(nn.Linear, Loads):
    pass


class LayerNorm(nn.LayerNorm, Loads):
    pass


class RMSNorm(nn.Module, Loads):
    """RMSNorm computed in fp32 (the vision tower's own; the decoder's is fused elsewhere)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def activation(name: str) -> nn.Module:
    if name == "gelu_pytorch_tanh":
        return nn.GELU(approximate="tanh")
    if name in ("gelu", "quick_gelu"):
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"vision activation {name!r} is not supported")


# ---- positions ------------------------------------------------------------------------------------
def block_order_hw(grids: list[tuple[int, int, int]], merge: int) -> np.ndarray:
    """(P, 2) (row, column) of every patch, in the order the processor lays patches out: frame by
    frame, `merge` x `merge` blocks in raster order, raster order inside a block."""
    out = []
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=1), (t, 1)))
    return np.concatenate(out)


def frame_lengths(grids: list[tuple[int, int, int]]) -> list[int]:
    """Patches per attention segment: one frame of one image."""
    return [h * w for t, h, w in grids for _ in range(t)]


def window_order(
    grids: list[tuple[int, int, int]], merge: int, window: int
) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL's windows: the merged patches (units of merge**2 patches) reordered so that each
    `window` x `window` block of them is contiguous, and the patch count of every window."""
    order, lengths, base = [], [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = -gh % window, -gw % window
        padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = (gh + ph) // window, (gw + pw) // window
        blocks = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4)
        blocks = blocks.reshape(t * nh * nw, window * window)
        for block in blocks:
            kept = block[block >= 0]
            if len(kept):
                order.append(kept + base)
                lengths.append(len(kept) * merge * merge)
        base += t * gh * gw
    return np.concatenate(order), lengths


def interpolation_taps(
    grids: list[tuple[int, int, int]], merge: int, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned (side x side) position table resampled to each image's grid, bilinear
    with corners aligned: per patch (in processor order) four table rows and their weights."""
    hw = block_order_hw(grids, merge).astype(np.float64)
    sizes = np.concatenate([np.tile([[h, w]], (t * h * w, 1)) for t, h, w in grids])
    src = hw * (side - 1) / np.maximum(sizes - 1, 1)  # align_corners: ends map to ends
    low = np.floor(src)
    taps, weights = [], []
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        r = np.clip(low[:, 0] + dr, 0, side - 1)
        c = np.clip(low[:, 1] + dc, 0, side - 1)
        wr = np.clip(1 - np.abs(src[:, 0] - low[:, 0] - dr), 0, None)
        wc = np.clip(1 - np.abs(src[:, 1] - low[:, 1] - dc), 0, None)
        taps.append((r * side + c).astype(np.int64))
        weights.append(wr * wc)
    return np.stack(taps, 1), np.stack(weights, 1).astype(np.float32)


class VisionRotary:
    """2-D rotary of the vision blocks: half the frequencies follow the row, half the column."""

    def __init__(self, head_dim: int, theta: float, device: torch.device) -> None:
        quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)
        self.inv_freq = (1.0 / theta**quarter).to(device)

    def cos_sin(self, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (hw[..., None].float() * self.inv_freq).flatten(1)  # (P, head_dim / 2): h | w
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in fp32, x (P, heads, D)."""
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """Full attention inside each segment of consecutive rows, (P, heads, D) each: segments of one
    length run as one batched call."""
    out = torch.empty_like(q)
    starts = np.cumsum([0, *lengths[:-1]])
    by_length: dict[int, list[int]] = {}
    for start, n in zip(starts, lengths, strict=True):
        by_length.setdefault(n, []).append(int(start))
    for n, group in by_length.items():
        rows = torch.as_tensor(np.add.outer(group, np.arange(n)), device=q.device)  # (G, n)
        qs, ks, vs = (x[rows].transpose(1, 2) for x in (q, k, v))  # (G, heads, n, D)
        out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x, rope, lengths):
        p = x.shape[0]
        q, k, v = self.qkv(x).view(p, 3, self.heads, -1).unbind(1)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        return self.proj(segment_attention(q, k, v, lengths).reshape(p, -1))


class GatedMLP(nn.Module):
    """Qwen2.5-VL's block MLP: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, dim: int, inter: int, act: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = Linear(dim, inter), Linear(dim, inter)
        self.down_proj = Linear(inter, dim)
        self.act = activation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    """Qwen3-VL's block MLP: fc2(act(fc1(x)))."""

    def __init__(self, dim: int, inter: int, act: str) -> None:
        super().__init__()
        self.linear_fc1, self.linear_fc2 = Linear(dim, inter), Linear(inter, dim)
        self.act = activation(act)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, vc: dict, qwen3: bool) -> None:
        super().__init__()
        dim, act = vc["hidden_size"], vc.get("hidden_act", "silu")
        norm = (lambda: LayerNorm(dim, eps=1e-6)) if qwen3 else (lambda: RMSNorm(dim))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = VisionAttention(dim, vc["num_heads"])
        mlp = PlainMLP if qwen3 else GatedMLP
        self.mlp = mlp(dim, vc["intermediate_size"], act)

    def forward(self, x, rope, lengths):
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class Qwen25Merger(nn.Module):
    """merge**2 neighbouring patches -> one language-model embedding."""

    def __init__(self, dim: int, out: int, merge: int) -> None:
        super().__init__()
        self.width = dim * merge * merge
        self.ln_q = RMSNorm(dim)
        self.mlp = nn.Sequential(Linear(self.width, self.width), nn.GELU(), Linear(self.width, out))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.width))


class Qwen3Merger(nn.Module):
    """As Qwen25Merger with a LayerNorm before the merge, or after it (`post`: DeepStack's)."""

    def __init__(self, dim: int, out: int, merge: int, post: bool) -> None:
        super().__init__()
        self.width, self.post = dim * merge * merge, post
        self.norm = LayerNorm(self.width if post else dim, eps=1e-6)
        self.linear_fc1 = Linear(self.width, self.width)
        self.act = nn.GELU()
        self.linear_fc2 = Linear(self.width, out)

    def forward(self, x):
        x = self.norm(x.view(-1, self.width)) if self.post else self.norm(x).view(-1, self.width)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """Qwen2.5-VL's or Qwen3-VL's tower, from the checkpoint's `vision_config`."""

    def __init__(self, vc: dict, qwen3: bool, device: torch.device) -> None:
        super().__init__()
        self.qwen3 = qwen3
        dim, self.merge = vc["hidden_size"], vc.get("spatial_merge_size", 2)
        patch_dim = vc.get("in_channels", 3) * vc.get("temporal_patch_size", 2)
        self.patch_dim = patch_dim * vc["patch_size"] ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = Linear(self.patch_dim, dim, bias=qwen3)
        theta = (vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        self.rotary = VisionRotary(dim // vc["num_heads"], theta, device)
        self.blocks = nn.ModuleList(VisionBlock(vc, qwen3) for _ in range(vc["depth"]))
        out = vc["out_hidden_size"]
        if qwen3:
            self.side = int(vc["num_position_embeddings"] ** 0.5)
            self.pos_embed = _Embedding(vc["num_position_embeddings"], dim)
            self.merger = Qwen3Merger(dim, out, self.merge, post=False)
            self.deepstack_indexes = list(vc.get("deepstack_visual_indexes") or [])
            self.deepstack_merger_list = nn.ModuleList(
                Qwen3Merger(dim, out, self.merge, post=True) for _ in self.deepstack_indexes
            )
        else:
            self.merger = Qwen25Merger(dim, out, self.merge)
            self.deepstack_indexes = []
            self.full_blocks = set(vc.get("fullatt_block_indexes") or [])
            self.window = vc.get("window_size", 112) // self.merge // vc["patch_size"]

    @property
    def num_deepstack(self) -> int:
        return len(self.deepstack_indexes)

    def weight_target(self, name: str) -> list[tuple[nn.Module, str, int]]:
        """Where the tower's checkpoint tensor `name` (after `visual.`) goes; [] if nowhere."""
        *path, param = name.split(".")
        module: Any = self
        for p in path:
            module = getattr(module, p, None)
        return [(module, param, 0)] if isinstance(module, Loads) else []

    def forward(
        self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(P, patch_dim) patches of the images `grids` -> (P / merge**2, out) embeddings, image by
        image, and the DeepStack features of the same shape (Qwen3-VL; else [])."""
        dev = pixels.device
        x = self.patch_embed.proj(pixels.to(self.patch_embed.proj.weight.dtype))
        hw = torch.as_tensor(block_order_hw(grids, self.merge), device=dev)
        rope = self.rotary.cos_sin(hw)
        frames = frame_lengths(grids)
        if self.qwen3:
            taps, weights = interpolation_taps(grids, self.merge, self.side)
            table = self.pos_embed.weight[torch.as_tensor(taps, device=dev)]  # (P, 4, dim)
            x = x + (table * torch.as_tensor(weights, device=dev)[..., None]).sum(1).to(x.dtype)
            deepstack = []
            for i, block in enumerate(self.blocks):
                x = block(x, rope, frames)
                if i in self.deepstack_indexes:
                    merger = self.deepstack_merger_list[self.deepstack_indexes.index(i)]
                    deepstack.append(merger(x))
            return self.merger(x), deepstack
        order, windows = window_order(grids, self.merge, self.window)
        unit = self.merge * self.merge
        patch_order = torch.as_tensor(
            (order[:, None] * unit + np.arange(unit)).reshape(-1), device=dev
        )
        x, rope = x[patch_order], (rope[0][patch_order], rope[1][patch_order])
        for i, block in enumerate(self.blocks):
            x = block(x, rope, frames if i in self.full_blocks else windows)
        merged = self.merger(x)
        return merged[torch.as_tensor(np.argsort(order), device=dev)], []


class _Embedding(nn.Module, Loads):
    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dim), requires_grad=False)
