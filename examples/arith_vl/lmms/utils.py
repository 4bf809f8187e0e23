"""Hooks of the lmms-eval task: the image travels in the jsonl as a PNG data URL."""

from __future__ import annotations

import base64
import io

from PIL import Image


def doc_to_visual(doc: dict) -> list[Image.Image]:
    header, _, payload = doc["image"].partition(",")
    assert header == "data:image/png;base64", header
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return [image]


def doc_to_text(doc: dict) -> str:
    """No question: the image is the problem."""
    return ""


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the generated text (surrounding whitespace dropped) with the answer."""
    return {"exact_match": float(results[0].strip() == doc["answer"])}
