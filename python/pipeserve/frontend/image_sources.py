"""Where a request's images come from, and the limits that keep one request from costing the front
end more than it may: `data:` URLs, `file://` URLs, http(s) URLs (only with --allow-image-fetch),
and for the SGLang-native API and the offline Engine also plain base64 strings, local paths, raw
bytes and (offline) PIL images. Every failure is an ImageError naming the image, never anything
else: a broken image is the request's problem, not the server's."""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

# Decoders tried on a request's bytes. PIL's other plugins (EPS calls Ghostscript, among others)
# have no business with an untrusted upload. MPO: the JPEG variant many phones write.
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
PATH_MAX = 4096  # a longer string is never taken for a local path


class ImageError(ValueError):
    """An image of a request that cannot be used; `param` names it (e.g. messages[0].content[1])."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 8  # per request (--max-images-per-request)
    max_pixels: int = 4096 * 4096  # decoded width * height, before any resize (--max-image-pixels)
    allow_fetch: bool = False  # http(s) URLs are fetched (--allow-image-fetch)
    max_bytes: int = 32 << 20  # encoded bytes of one image (a file, a fetch)
    fetch_timeout_s: float = 10.0


def open_image(source: Any, name: str, limits: ImageLimits) -> Image.Image:
    """The decoded image of `source`, checked against `limits` before its pixels are decoded."""
    if isinstance(source, Image.Image):
        _check_pixels(source, name, limits)
        return source
    data = source if isinstance(source, bytes | bytearray) else _bytes_of(source, name, limits)
    return _decode(bytes(data), name, limits)


def _bytes_of(source: Any, name: str, limits: ImageLimits) -> bytes:
    if not isinstance(source, str) or not source:
        raise ImageError(f"{name} must be a non-empty string (a URL, a path or base64)", name)
    scheme = source[:8].lower()
    if scheme.startswith("data:"):
        return _data_url(source, name, limits)
    if scheme.startswith("file://"):
        return _read_file(_file_url_path(source, name), name, limits)
    if scheme.startswith(("http://", "https://")):
        return _fetch(source, name, limits)
    if len(source) <= PATH_MAX and os.path.isfile(source):
        return _read_file(source, name, limits)
    return _base64(source, name, limits)


def _data_url(url: str, name: str, limits: ImageLimits) -> bytes:
    """`data:image/png;base64,...`: only base64 payloads carry binary images."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageError(f"{name}: a data URL must be data:image/...;base64,<data>", name)
    return _base64(payload, name, limits)


def _base64(text: str, name: str, limits: ImageLimits) -> bytes:
    if len(text) // 4 * 3 > limits.max_bytes:
        raise _too_large(name, len(text) // 4 * 3, limits)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(
            f"{name} is neither a URL (data:, file://, http(s)://), an existing file, nor valid "
            "base64",
            name,
        ) from None


def _file_url_path(url: str, name: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageError(
            f"{name}: a file:// URL must name a local file, got host {parsed.netloc!r}", name
        )
    return urllib.parse.unquote(parsed.path)


def _read_file(path: str, name: str, limits: ImageLimits) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_bytes:
                raise _too_large(name, size, limits)
            return f.read(limits.max_bytes + 1)
    except OSError as e:
        raise ImageError(f"{name}: cannot read {path!r}: {e.strerror or e}", name) from None


def _fetch(url: str, name: str, limits: ImageLimits) -> bytes:
    """One GET, bounded in time and size."""
    if not limits.allow_fetch:
        raise ImageError(
            f"{name}: http(s) image URLs are not fetched by this server (it runs without "
            "--allow-image-fetch); send the image as a data:image/...;base64 URL",
            name,
        )
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as response:
            data = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageError(f"{name}: fetching {url[:200]!r} failed: {e}", name) from None
    if len(data) > limits.max_bytes:
        raise _too_large(name, len(data), limits)
    return data


def _too_large(name: str, size: int, limits: ImageLimits) -> ImageError:
    return ImageError(
        f"{name} has {size} bytes or more; the limit is {limits.max_bytes} bytes per image", name
    )


def _decode(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    """Opens the header, checks the size it declares, then decodes. Any decoder failure (truncated
    data, a corrupt stream: PIL raises OSError, SyntaxError, ValueError and more) is the image's
    ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit rules
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        _check_pixels(image, name, limits)
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own bound, when above ours
        raise ImageError(
            f"{name}: {e}; the limit is {limits.max_pixels} pixels per image (--max-image-pixels)",
            name,
        ) from None
    except Exception as e:  # any decoder failure (see the docstring)
        raise ImageError(
            f"{name} is not a decodable image ({type(e).__name__}: {e})", name
        ) from None
    return image


def _check_pixels(image: Image.Image, name: str, limits: ImageLimits) -> None:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_pixels} pixels per image (--max-image-pixels)",
            name,
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name} has no pixels ({width}x{height})", name)


def image_data_per_prompt(
    image_data: Any, num_prompts: int, batch: bool, field: str = "image_data"
) -> list[tuple[list[Any], list[str]]]:
    """SGLang's `image_data` as (sources, names) per prompt: for one prompt, an image or a list
    of images; for a batch, one entry per prompt (None, an image, or a list of images)."""
    if image_data is None:
        return [([], []) for _ in range(num_prompts)]
    entries = image_data if batch else [image_data]
    if batch and (not isinstance(image_data, list) or len(image_data) != num_prompts):
        got = len(image_data) if isinstance(image_data, list) else type(image_data).__name__
        raise ImageError(
            f"'{field}' must hold one entry per prompt ({num_prompts}) for a batch, got {got}",
            field,
        )
    out = []
    for i, entry in enumerate(entries):
        name = f"{field}[{i}]" if batch else field
        if isinstance(entry, list):
            out.append((entry, [f"{name}[{j}]" for j in range(len(entry))]))
        else:
            out.append(([], []) if entry is None else ([entry], [name]))
    return out
