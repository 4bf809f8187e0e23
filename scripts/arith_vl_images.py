"""Images of arithmetic problems for the embedded vision-language model (train_default_vl.py).

A problem such as "123-45" is drawn as its text, one line of 28x28 cells, one character per cell,
in the 5x7 bitmap font below, scaled 3x: the image is 28 pixels high and 28 * len(text) wide. The
font is data in this file, so the pixels do not depend on the Pillow build or on any font file.
With Qwen2.5-VL's 14-pixel patches merged 2x2, a cell is one image token: the image's tokens are
the problem's characters in order, as the text model reads them one token per character.
Each image varies in where the text sits inside the cells and in its grey levels.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

CELL = 28  # pixels: one 2x2 group of 14-pixel patches, so one image token per character
SCALE = 3  # a font pixel is SCALE x SCALE image pixels: glyphs are 15 x 21
MIN_CHARS, MAX_CHARS = 3, 7  # "0+0" .. "999-999"; a problem of n characters is n image tokens
HEIGHT = CELL  # one line: patch grid (t, h, w) = (1, 2, 2 * len(text))
GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
}
GLYPH_W, GLYPH_H = 5 * SCALE, 7 * SCALE
SLACK_X, SLACK_Y = CELL - GLYPH_W, CELL - GLYPH_H  # 13, 7: a glyph never leaves its cell


@dataclass(frozen=True)
class Style:
    """Where and how dark one image's characters are; offsets are inside each 28-pixel cell."""

    dx: int  # 1..SLACK_X-1, shared by the characters
    dy: int  # 1..SLACK_Y-1
    jitter: tuple[tuple[int, int], ...]  # per character (x, y) in -1..1
    paper: int  # grey level of the background
    ink: int  # grey level of the strokes, at least 80 darker than the paper


def random_style(rng: random.Random) -> Style:
    paper = rng.randint(170, 255)
    return Style(
        dx=rng.randint(1, SLACK_X - 1),
        dy=rng.randint(1, SLACK_Y - 1),
        jitter=tuple((rng.randint(-1, 1), rng.randint(-1, 1)) for _ in range(MAX_CHARS)),
        paper=paper,
        ink=rng.randint(0, paper - 80),
    )


def problem_text(a: int, op: str, b: int) -> str:
    """The problem as the text model reads it, one cell per character: (12, "+", 345) -> "12+345"."""
    if not (0 <= a <= 999 and 0 <= b <= 999 and op in "+-"):
        raise ValueError(f"not a problem on 0..999: {a}{op}{b}")
    return f"{a}{op}{b}"


def render(a: int, op: str, b: int, style: Style) -> Image.Image:
    """A (CELL * len(text)) x CELL greyscale image of the problem a op b."""
    text = problem_text(a, op, b)
    image = Image.new("L", (CELL * len(text), HEIGHT), style.paper)
    draw = ImageDraw.Draw(image)
    for k, char in enumerate(text):
        jx, jy = style.jitter[k]
        left, top = k * CELL + style.dx + jx, style.dy + jy
        for row, line in enumerate(GLYPHS[char]):
            for col, bit in enumerate(line):
                if bit == "#":
                    x, y = left + col * SCALE, top + row * SCALE
                    draw.rectangle((x, y, x + SCALE - 1, y + SCALE - 1), fill=style.ink)
    return image


def to_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def from_data_url(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"not a base64 image data URL: {header[:40]!r}")
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image
