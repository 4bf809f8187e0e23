"""A vision-language request's images as stage 0's scheduler keeps them, and what a microbatch's
descriptor says of them: which images stage 0 encodes, which new tokens are image tokens, and the
multimodal rotary positions (Qwen-VL's M-RoPE, computed here once, carried to every stage).

An image's tokens are one run of image-pad tokens in the prompt (the front end expanded them);
the vision tower's output replaces their embeddings on stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeserve.ipc.messages import ImageIn
from pipeserve.scheduler.req import Req


@dataclass(frozen=True)
class VisionSpec:
    """What stage 0 needs to know of the model's images."""

    image_token_id: int
    merge: int  # spatial_merge_size: merge x merge patches make one token
    patch_dim: int  # floats per patch: channels x temporal_patch x patch x patch

    @classmethod
    def of(cls, vision: dict | None, image_token_id: int | None) -> VisionSpec | None:
        if vision is None or image_token_id is None:
            return None
        patch_dim = vision.get("in_channels", 3) * vision.get("temporal_patch_size", 2)
        return cls(
            image_token_id,
            vision.get("spatial_merge_size", 2),
            patch_dim * vision["patch_size"] ** 2,
        )


@dataclass(frozen=True)
class ReqImage:
    start: int  # prompt position of its first token
    num_tokens: int
    grid: tuple[int, int, int]  # (t, h, w) in patches
    pixels: np.ndarray  # (t * h * w, patch_dim) float32
    digest: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


def attach_images(req: Req, images: list[ImageIn], spec: VisionSpec | None) -> None:
    """Sets `req`'s images, rotary positions and prefix-cache key from the front end's images;
    ValueError (the request's error) when they do not fit its prompt."""
    if not images:
        return
    if spec is None:
        raise ValueError("this model does not accept images")
    ids = np.asarray(req.prompt_ids, dtype=np.int64)
    is_pad = np.concatenate([[False], ids == spec.image_token_id, [False]])
    edges = np.flatnonzero(np.diff(is_pad.astype(np.int8)))
    runs = list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    if len(runs) != len(images):
        raise ValueError(
            f"the prompt has {len(runs)} image placeholder(s) for {len(images)} image(s)"
        )
    out = []
    for i, ((start, end), image) in enumerate(zip(runs, images, strict=True)):
        t, h, w = (int(x) for x in image.grid)
        if min(t, h, w) < 1 or h % spec.merge or w % spec.merge:
            raise ValueError(f"image {i}: grid {image.grid} is not a whole number of tokens")
        tokens = t * h * w // spec.merge**2
        if end - start != tokens:
            raise ValueError(
                f"image {i}: {end - start} placeholder tokens for {tokens} image tokens"
            )
        if len(image.pixels) != t * h * w * spec.patch_dim * 4:
            raise ValueError(
                f"image {i}: {len(image.pixels)} bytes of patches for grid {image.grid}"
            )
        pixels = np.frombuffer(image.pixels, np.float32).reshape(t * h * w, spec.patch_dim)
        out.append(ReqImage(start, tokens, (t, h, w), pixels, int(image.digest)))
    req.images = out
    req.mrope, req.rope_delta = rope_positions(len(ids), out, spec.merge)
    key = list(req.prompt_ids)
    for image in out:  # an image's tokens are keyed by its pixels, not by the shared pad id
        key[image.start : image.end] = image_keys(image)
    req.cache_key = key


def image_keys(image: ReqImage) -> list[int]:
    """Negative (never a token id) and distinct per image content and token."""
    base = (image.digest * 1_000_003) % (1 << 61)
    return [-1 - ((base + k) % (1 << 61)) for k in range(image.num_tokens)]


def rope_positions(length: int, images: list[ReqImage], merge: int) -> tuple[np.ndarray, int]:
    """(3, length) (t, h, w) rotary positions of a prompt and the delta of every later token:
    text tokens count on from the last position; an image's tokens take its grid's (t, row,
    column) offset from where it starts, and the text after it starts past its largest offset."""
    pos = np.zeros((3, length), np.int64)
    at, cursor = 0, 0  # next prompt index, next position
    for image in images:
        n = image.start - at
        pos[:, at : image.start] = cursor + np.arange(n)
        cursor += n
        t, h, w = image.grid[0], image.grid[1] // merge, image.grid[2] // merge
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        pos[:, image.start : image.end] = cursor + np.stack([tt, hh, ww]).reshape(3, -1)
        cursor += max(h, w)
        at = image.end
    pos[:, at:] = cursor + np.arange(length - at)
    return pos, int(pos.max(initial=-1)) + 1 - length


@dataclass
class StepImages:
    mrope: np.ndarray
    visual: np.ndarray
    images: np.ndarray
    pixels: np.ndarray


def describe_images(
    chosen: list[tuple[Req, int]], prefix: list[int], admitted: set[int]
) -> StepImages:
    """The descriptor's image columns for requests `chosen` (request, new tokens) whose new tokens
    start at `prefix`; `admitted`: ids of those (re)admitted now, whose images that any new or later
    token still needs are encoded in this step."""
    empty = np.zeros(0, np.int64)
    if not any(r.images for r, _ in chosen):
        return StepImages(empty, empty, empty, np.zeros(0, np.float32))
    visual, encode, pixels, mrope_parts, row, patches = [], [], [], [], 0, 0
    needs_mrope = False
    for (req, n), p in zip(chosen, prefix, strict=True):
        window = np.arange(p, p + n)
        if req.images and p < len(req.prompt_ids):
            needs_mrope = True
            inside = window[window < len(req.prompt_ids)]
            after = window[window >= len(req.prompt_ids)] + req.rope_delta
            mrope_parts.append(np.concatenate([req.mrope[:, inside], np.tile(after, (3, 1))], 1))
        else:
            mrope_parts.append(np.tile(window + req.rope_delta, (3, 1)))
        for k, image in enumerate(req.images):
            if id(req) in admitted and image.end > p:
                t, h, w = image.grid
                encode.append([req.req_pool_idx, k, t, h, w, patches])
                pixels.append(image.pixels)
                patches += len(image.pixels)
            lo, hi = max(p, image.start), min(p + n, image.end)
            if lo < hi:
                tok = np.arange(lo, hi)
                block = [row + tok - p, np.full(hi - lo, req.req_pool_idx), np.full(hi - lo, k)]
                visual.append(np.stack([*block, tok - image.start]))
        row += n
    return StepImages(
        np.concatenate(mrope_parts, 1).reshape(-1) if needs_mrope else empty,
        np.concatenate(visual, 1).reshape(-1) if visual else empty,
        np.asarray(encode, np.int64).reshape(-1),
        np.concatenate(pixels).reshape(-1) if pixels else np.zeros(0, np.float32),
    )
