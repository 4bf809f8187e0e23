"""Rotary position embedding (rotate-half layout) with default, linear and llama3 frequency scaling."""

from __future__ import annotations

import math

import torch

from pipeserve.model.config import RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3(inv_freq, rope)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Long wavelengths are slowed by `factor`, short ones kept, the band between blended."""
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def mrope_axes(head_dim: int, rope: RopeConfig) -> torch.Tensor | None:
    """(head_dim // 2,) int64: which position axis (0 = t, 1 = h, 2 = w) turns each frequency of a
    multimodal rotary (Qwen-VL); None for a one-axis rotary. In blocks (Qwen2.5-VL: the first
    section's frequencies follow t, the next h, then w) or interleaved (Qwen3-VL: t h w t h w ...,
    the rest t)."""
    if not rope.mrope_section:
        return None
    half = head_dim // 2
    if sum(rope.mrope_section) != half:
        raise ValueError(
            f"mrope_section {rope.mrope_section} does not sum to head_dim / 2 = {half}"
        )
    if not rope.mrope_interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(rope.mrope_section))
    axes = torch.zeros(half, dtype=torch.int64)
    for axis in (1, 2):
        axes[axis : 3 * rope.mrope_section[axis] : 3] = axis
    return axes


class RotaryEmbedding:
    def __init__(self, head_dim: int, rope: RopeConfig, device: torch.device) -> None:
        self.inv_freq = inverse_frequencies(head_dim, rope).to(device)
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin of every position
        axes = mrope_axes(head_dim, rope)
        self.axes = None if axes is None else axes.to(device)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) positions -> cos, sin of shape (N, head_dim), computed in fp32, cast to `dtype`;
        read from the table when `build_table` made one (the same values: two gathers instead of
        seven kernels per forward)."""
        if self.table is not None and self.table[0].dtype == dtype:
            return self.table[0][positions], self.table[1][positions]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def cos_sin_3d(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A multimodal rotary's cos, sin (N, head_dim) for (3, N) positions (t, h, w): each
        frequency turns with its axis's position. Where the three agree it equals `cos_sin`."""
        picked = positions[self.axes].float()  # (head_dim // 2, N): each frequency's axis
        freqs = picked.T * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def build_table(self, num_positions: int, dtype: torch.dtype) -> None:
        positions = torch.arange(num_positions, device=self.inv_freq.device)
        self.table = self.cos_sin(positions, dtype)
