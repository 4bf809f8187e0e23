"""A vision-language model's image preprocessing in the front end (frontend/images.py): equal to
transformers' Qwen2VLImageProcessorPil; and where images come from, with their limits and errors
(frontend/image_sources.py)."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from checkpoints import VL_END, VL_PAD, VL_START, write_preprocessor_config
from pipeserve.config import EngineConfig
from pipeserve.frontend.image_sources import (
    ImageError,
    ImageLimits,
    image_data_per_prompt,
    open_image,
)
from pipeserve.frontend.images import ImageProcessor, VisionSpec

FAMILIES = {"qwen2_5_vl": 14, "qwen3_vl": 16}  # patch sizes


def vision_dir(path, family: str, **prep: int) -> str:
    """A checkpoint directory with only what the front end reads: config.json (token ids and the
    vision tower's geometry) and preprocessor_config.json."""
    vision = {"patch_size": FAMILIES[family], "temporal_patch_size": 2, "spatial_merge_size": 2}
    config = {"model_type": family, "vision_config": vision, "image_token_id": VL_PAD}
    config |= {"vision_start_token_id": VL_START, "vision_end_token_id": VL_END}
    (path / "config.json").write_text(json.dumps(config))
    write_preprocessor_config(str(path), family, **prep)
    return str(path)


def random_image(rng, height: int, width: int, mode: str) -> Image.Image:
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P+transparency":  # a palette image with a transparent colour (GIF-like)
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 3
        return image
    return rgba.convert(mode)


SHAPES = [
    (100, 150, "RGB"),
    (37, 301, "RGBA"),  # wide; transparency composited onto white
    (5, 9, "L"),  # below min_pixels: scaled up
    (1000, 700, "P"),  # above max_pixels: scaled down
    (28, 28, "LA"),
    (250, 40, "P+transparency"),
    (64, 3000, "CMYK"),  # aspect ratio 47
    (333, 333, "RGB"),
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixels_and_grid_equal_transformers(tmp_path, family):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = vision_dir(tmp_path, family)
    spec = VisionSpec.from_dir(path)
    assert spec is not None and spec.patch_size == FAMILIES[family]
    reference = Qwen2VLImageProcessorPil.from_pretrained(path)
    rng = np.random.default_rng(0)
    for height, width, mode in SHAPES:
        image = random_image(rng, height, width, mode)
        ours = spec.preprocess(image)
        want = reference(images=[image], return_tensors="np")
        assert ours.grid == tuple(int(x) for x in want["image_grid_thw"][0]), (height, width, mode)
        pixels = np.frombuffer(ours.pixels, np.float32).reshape(want["pixel_values"].shape)
        np.testing.assert_array_equal(pixels, want["pixel_values"], err_msg=f"{height}x{width}")
        assert spec.num_tokens(ours.grid) * 4 == ours.grid[1] * ours.grid[2]


def test_the_checkpoints_normalisation_is_read_not_assumed(tmp_path):
    """Qwen2.5-VL: CLIP mean/std, patch 14, min/max_pixels; Qwen3-VL: 0.5, patch 16, a size dict."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    qwen25 = VisionSpec.from_dir(vision_dir(tmp_path / "a", "qwen2_5_vl", max_tokens=9))
    qwen3 = VisionSpec.from_dir(vision_dir(tmp_path / "b", "qwen3_vl", min_tokens=2))
    assert qwen25.image_mean[0] == pytest.approx(0.48145466) and qwen25.max_pixels == 9 * 28 * 28
    assert qwen3.image_std == (0.5, 0.5, 0.5) and qwen3.min_pixels == 2 * 32 * 32
    assert (qwen25.image_token_id, qwen25.vision_start_token_id) == (VL_PAD, VL_START)


def test_a_text_model_has_no_vision_spec_and_a_vision_model_needs_its_preprocessing(tmp_path):
    assert VisionSpec.from_dir(EngineConfig.model_path) is None
    vision_dir(tmp_path, "qwen3_vl")
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config\.json"):
        VisionSpec.from_dir(str(tmp_path))


def test_images_with_an_extreme_aspect_ratio_are_refused(tmp_path):
    spec = VisionSpec.from_dir(vision_dir(tmp_path, "qwen2_5_vl"))
    with pytest.raises(ImageError, match="aspect ratio"):
        spec.preprocess(Image.new("RGB", (2010, 10)), "image_data[1]")


def test_the_digest_follows_the_pixels(tmp_path):
    spec = VisionSpec.from_dir(vision_dir(tmp_path, "qwen2_5_vl"))
    rng = np.random.default_rng(1)
    a, b = random_image(rng, 60, 80, "RGB"), random_image(rng, 60, 80, "RGB")
    assert spec.preprocess(a).digest == spec.preprocess(a.copy()).digest
    assert spec.preprocess(a).digest != spec.preprocess(b).digest
    assert 0 <= spec.preprocess(a).digest < 2**63


# ---- sources ------------------------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def image():
    return random_image(np.random.default_rng(2), 40, 50, "RGB")


def test_every_source_kind_gives_the_same_image(tmp_path, image):
    data = png_bytes(image)
    file = tmp_path / "a b.png"
    file.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [
        f"data:image/png;base64,{b64}",
        f"file://{str(file).replace(' ', '%20')}",
        str(file),
        b64,
        data,
        image,
    ]
    for source in sources:
        got = open_image(source, "image", ImageLimits())
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(image))


def test_http_urls_are_refused_unless_fetching_is_allowed(tmp_path, image):
    (tmp_path / "cat.png").write_bytes(png_bytes(image))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    try:
        with pytest.raises(ImageError, match="--allow-image-fetch") as e:
            open_image(url, "messages[0].content[1]", ImageLimits())
        assert e.value.param == "messages[0].content[1]"
        got = open_image(url, "image", ImageLimits(allow_fetch=True))
        assert np.array_equal(np.asarray(got), np.asarray(image))
        with pytest.raises(ImageError, match="bytes per image"):
            open_image(url, "image", ImageLimits(allow_fetch=True, max_bytes=100))
        with pytest.raises(ImageError, match="fetching"):
            open_image(url + "-missing", "image", ImageLimits(allow_fetch=True))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "source, match",
    [
        ("data:image/png;base64,!!!!", "valid base64"),
        ("data:text/plain,hello", "data:image/...;base64"),
        ("file:///no/such/file.png", "cannot read"),
        ("file://otherhost/x.png", "local file"),
        ("not base64 and not a path", "valid base64"),
        (base64.b64encode(b"plain text, no image").decode(), "not a decodable image"),
        ("", "non-empty string"),
        (12, "non-empty string"),
    ],
)
def test_a_bad_source_is_an_error_naming_the_image(source, match):
    with pytest.raises(ImageError, match=match) as e:
        open_image(source, "image_data[3]", ImageLimits())
    assert e.value.param == "image_data[3]"


def test_truncated_and_oversized_images_are_refused_before_decoding(image):
    data = png_bytes(image)
    with pytest.raises(ImageError, match="image_data\\[0\\] is not a decodable image"):
        open_image(data[: len(data) // 2], "image_data[0]", ImageLimits())
    with pytest.raises(ImageError, match="40 = 2000 pixels; the limit is 1000 pixels"):
        open_image(data, "image_data[0]", ImageLimits(max_pixels=1000))
    with pytest.raises(ImageError, match="limit is 1000 pixels"):
        open_image(image, "image_data[0]", ImageLimits(max_pixels=1000))


def test_a_decompression_bomb_is_refused_from_its_header():
    """A PNG header declaring 100000 x 100000 pixels, and no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="limit"):
        open_image(bomb, "image", ImageLimits())
    with pytest.raises(ImageError, match="limit is 16 pixels"):
        open_image(bomb, "image", ImageLimits(max_pixels=16))


def test_image_data_as_sglang_takes_it():
    assert image_data_per_prompt(None, 2, True) == [([], []), ([], [])]
    assert image_data_per_prompt("a", 1, False) == [(["a"], ["image_data"])]
    assert image_data_per_prompt(["a", "b"], 1, False) == [
        (["a", "b"], ["image_data[0]", "image_data[1]"])
    ]
    assert image_data_per_prompt(["a", None, ["b", "c"]], 3, True) == [
        (["a"], ["image_data[0]"]),
        ([], []),
        (["b", "c"], ["image_data[2][0]", "image_data[2][1]"]),
    ]
    with pytest.raises(ImageError, match="one entry per prompt \\(2\\)"):
        image_data_per_prompt(["a"], 2, True)


# ---- a request's images -------------------------------------------------------------------------------
def processor(path: str, **limits) -> ImageProcessor:
    cfg = EngineConfig(model_path=path, **limits)
    return ImageProcessor.load(cfg, "tiny-vl")


def test_the_image_count_limit_names_itself(tmp_path, image):
    images = processor(vision_dir(tmp_path, "qwen2_5_vl"), max_images_per_request=2)
    with pytest.raises(ImageError, match="3 images; the limit is 2 per request") as e:
        images.process([image] * 3, ["a", "b", "c"])
    assert e.value.param == "c"


def test_a_text_model_does_not_accept_images(image):
    images = processor(EngineConfig.model_path)
    assert not images.accepts_images
    assert images.expand_tokens([1, 2, VL_PAD], [], "prompt") == [1, 2, VL_PAD]
    with pytest.raises(ImageError, match="model tiny-vl does not accept images"):
        images.process([image], ["image_data"])


def test_each_placeholder_run_becomes_its_images_tokens(tmp_path):
    images = processor(vision_dir(tmp_path, "qwen2_5_vl"))
    small = images.process([Image.new("RGB", (56, 56))], ["a"])[0]  # 2x2 merged: 4 tokens
    wide = images.process([Image.new("RGB", (168, 56))], ["b"])[0]  # 6x2: ... 12 tokens
    assert (small.grid, wide.grid) == ((1, 4, 4), (1, 4, 12))
    ids = [1, VL_START, VL_PAD, VL_END, 9, VL_START, VL_PAD, VL_PAD, VL_END, 7]
    got = images.expand_tokens(ids, [wide, small], "text")
    want = [1, VL_START] + [VL_PAD] * 12 + [VL_END, 9, VL_START] + [VL_PAD] * 4 + [VL_END, 7]
    assert got == want
    assert images.expand_tokens(got, [wide, small], "text") == want  # expanded already: kept
    with pytest.raises(ImageError, match="'text' holds 2 image placeholder\\(s\\) for 1 image"):
        images.expand_tokens(ids, [small], "text")
    with pytest.raises(ImageError, match="holds 0 image placeholder"):
        images.expand_tokens([1, 2], [small], "text")
