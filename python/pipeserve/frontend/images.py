"""A vision-language model's images in the front end (numpy and PIL only): the model's own
preprocessing, read from its checkpoint, and the image tokens of a prompt.

The arithmetic is that of transformers' Qwen2VLImageProcessorPil (Qwen2-VL, Qwen2.5-VL, Qwen3-VL),
and its output is equal to it: RGB (transparency composited onto white), a bicubic resize to a
size whose sides are multiples of patch_size * merge_size with a pixel count within [min_pixels,
max_pixels], rescale (in float64, then float32), normalise (float32), then patches of
(channels, temporal_patch_size, patch, patch), the one frame repeated in time, ordered so that
each merge_size x merge_size window of patches is contiguous. A prompt holds one image-pad token
per merged patch for each image; stage 0 takes the i-th run of them as image i.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeserve.config import EngineConfig
from pipeserve.frontend.image_sources import (
    ImageError,
    ImageLimits,
    image_data_per_prompt,
    open_image,
)
from pipeserve.ipc.messages import ImageIn

PREPROCESSOR_CONFIG = "preprocessor_config.json"
MAX_ASPECT_RATIO = 200  # the processor refuses longer strips
# transformers' defaults where a preprocessor_config.json leaves them out
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280


@dataclass(frozen=True)
class VisionSpec:
    """What a checkpoint says about its images: the token ids of config.json and the
    preprocessing of preprocessor_config.json (patch geometry checked against vision_config)."""

    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dir(cls, path: str) -> VisionSpec | None:
        """None for a model without a vision tower."""
        config = _read_json(os.path.join(path, "config.json"))
        vision = config.get("vision_config")
        if vision is None or "image_token_id" not in config:
            return None
        if not os.path.isfile(os.path.join(path, PREPROCESSOR_CONFIG)):
            raise FileNotFoundError(
                f"{path} holds a vision-language model but no {PREPROCESSOR_CONFIG} (how its "
                "images are preprocessed)"
            )
        prep = _read_json(os.path.join(path, PREPROCESSOR_CONFIG))
        geometry = {
            "patch_size": vision.get("patch_size"),
            "temporal_patch_size": vision.get("temporal_patch_size"),
            "merge_size": vision.get("spatial_merge_size"),
        }
        for key, value in geometry.items():
            geometry[key] = prep.get(key, value)
            if value is not None and geometry[key] != value:
                raise ValueError(
                    f"{PREPROCESSOR_CONFIG}: {key} {geometry[key]}, the vision tower's {value}"
                )
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if prep.get(key, True) is not True:
                raise ValueError(f"{PREPROCESSOR_CONFIG}: {key} other than true is not supported")
        size = prep.get("size") or {}
        return cls(
            image_token_id=config["image_token_id"],
            vision_start_token_id=config["vision_start_token_id"],
            vision_end_token_id=config["vision_end_token_id"],
            min_pixels=prep.get("min_pixels", size.get("shortest_edge", DEFAULT_MIN_PIXELS)),
            max_pixels=prep.get("max_pixels", size.get("longest_edge", DEFAULT_MAX_PIXELS)),
            image_mean=tuple(prep["image_mean"]),
            image_std=tuple(prep["image_std"]),
            rescale_factor=prep.get("rescale_factor", 1 / 255),
            resample=prep.get("resample", Image.Resampling.BICUBIC),
            **geometry,
        )

    @property
    def factor(self) -> int:
        """What both sides of a resized image are multiples of."""
        return self.patch_size * self.merge_size

    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.merge_size**2

    def resized_size(self, height: int, width: int, name: str = "image") -> tuple[int, int]:
        if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
            raise ImageError(
                f"{name} is {width}x{height}: its aspect ratio is above {MAX_ASPECT_RATIO}", name
            )
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def preprocess(self, image: Image.Image, name: str = "image") -> ImageIn:
        rgb = to_rgb(image)
        height, width = self.resized_size(rgb.height, rgb.width, name)
        resized = np.asarray(rgb.resize((width, height), resample=self.resample))  # (H, W, 3) u8
        return self.to_image_in(self.value_table[resized, np.arange(3)])

    @functools.cached_property
    def value_table(self) -> np.ndarray:
        """(256, 3) float32: each byte value rescaled (float64, then float32) and normalised
        (float32) per channel. A lookup gives the processor's values exactly: each depends on the
        byte and the channel alone."""
        scaled = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)
        return (scaled[:, None] - mean) / np.asarray(self.image_std, np.float32)

    def to_image_in(self, pixels: np.ndarray) -> ImageIn:
        """(H, W, C) float32 pixels as patches (grid_h * grid_w, C * temporal * patch * patch),
        each merge window's patches in a row, row-major within it."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width, channels = pixels.shape
        grid = (1, height // p, width // p)
        windows = pixels.reshape(grid[1] // m, m, p, grid[2] // m, m, p, channels)
        windows = windows.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, p, p)
        frames = np.repeat(windows[:, :, :, :, :, None], t, axis=5)  # (..., C, t, p, p)
        data = np.ascontiguousarray(frames, np.float32).tobytes()
        return ImageIn(data, grid, pixel_digest(data, grid))


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width): the nearest multiples of `factor` (Python's round, halves to even), scaled
    down to at most `max_pixels` or up to at least `min_pixels` keeping the aspect ratio."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; an image with transparency is composited onto white first."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def pixel_digest(data: bytes, grid: tuple[int, int, int]) -> int:
    """63 bits of a hash of the patches and their grid: the prefix cache's key for the image."""
    h = hashlib.blake2b(data, digest_size=8)
    h.update(np.asarray(grid, np.int64).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class ImageProcessor:
    """A front end's image side for one model: a request's image sources to ImageIn messages, and
    the prompt's image tokens to their counts. `spec` None: the model takes no images."""

    spec: VisionSpec | None
    limits: ImageLimits
    model_name: str
    placeholder: str  # how a prompt's text marks one image

    @classmethod
    def load(cls, cfg: EngineConfig, model_name: str, tokenizer: Any = None) -> ImageProcessor:
        """`tokenizer` (optional) spells the placeholder in error messages."""
        spec = VisionSpec.from_dir(cfg.model_path)
        limits = ImageLimits(
            cfg.max_images_per_request, cfg.max_image_pixels, cfg.allow_image_fetch
        )
        placeholder = ""
        if spec is not None:
            ids = [spec.vision_start_token_id, spec.image_token_id, spec.vision_end_token_id]
            placeholder = f"token ids {ids}"
            if tokenizer is not None:
                placeholder = "".join(tokenizer.convert_ids_to_tokens(ids))
        return cls(spec, limits, model_name, placeholder)

    @classmethod
    def text_only(cls, model_name: str) -> ImageProcessor:
        return cls(None, ImageLimits(), model_name, "")

    @property
    def accepts_images(self) -> bool:
        return self.spec is not None

    def process(self, sources: list[Any], names: list[str]) -> list[ImageIn]:
        """Each source (see image_sources) opened, checked and preprocessed; ImageError names the
        first one that fails, or the limit a request exceeds."""
        if not sources:
            return []
        if self.spec is None:
            raise ImageError(f"model {self.model_name} does not accept images", names[0])
        if len(sources) > self.limits.max_images:
            raise ImageError(
                f"the request has {len(sources)} images; the limit is {self.limits.max_images} "
                "per request (--max-images-per-request)",
                names[self.limits.max_images],
            )
        spec = self.spec
        return [
            spec.preprocess(open_image(s, n, self.limits), n)
            for s, n in zip(sources, names, strict=True)
        ]

    def prepare(
        self, ids: list[int], sources: list[Any], names: list[str], param: str
    ) -> tuple[list[int], list[ImageIn]]:
        """A prompt's ids with its images' tokens, and the images (`param`: the prompt's field)."""
        images = self.process(sources, names)
        return self.expand_tokens(ids, images, param), images

    def prepare_prompts(
        self, prompts: list[list[int]], image_data: Any, batch: bool, param: str
    ) -> tuple[list[list[int]], list[list[ImageIn]]]:
        """`prepare` for every prompt of SGLang's `image_data` (see image_data_per_prompt)."""
        sources = image_data_per_prompt(image_data, len(prompts), batch)
        prepared = [
            self.prepare(ids, items, names, param)
            for ids, (items, names) in zip(prompts, sources, strict=True)
        ]
        return [ids for ids, _ in prepared], [images for _, images in prepared]

    def expand_tokens(self, ids: list[int], images: list[ImageIn], param: str) -> list[int]:
        """`ids` with each run of image-pad tokens (one per image, in order) set to its image's
        token count; a prompt whose runs and images disagree in number is refused."""
        if self.spec is None:
            return ids
        pad = self.spec.image_token_id
        runs = _runs(ids, pad)
        if len(runs) != len(images):
            raise ImageError(
                f"'{param}' holds {len(runs)} image placeholder(s) for {len(images)} image(s): "
                f"each image needs one {self.placeholder} in the prompt, in order",
                param,
            )
        out, start = [], 0
        for (begin, end), image in zip(runs, images, strict=True):
            out += ids[start:begin]
            out += [pad] * self.spec.num_tokens(image.grid)
            start = end
        return out + ids[start:]


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """[begin, end) of every maximal run of `token`."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != token:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
