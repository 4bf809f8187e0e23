"""Vision-language models (Qwen2.5-VL, Qwen3-VL): greedy tokens identical to `transformers` on
tiny random checkpoints, with images of several sizes and counts, at pp 1-3, tp 2 and with chunk
boundaries inside an image."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from checkpoints import VL_END, VL_PAD, VL_START, hf_vl_greedy, make_vl_checkpoint
from pipeserve import Engine
from pipeserve.ipc.messages import ImageIn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NEW = 8


def _image(rng: np.random.Generator, grid: tuple[int, int, int], patch: int) -> ImageIn:
    t, h, w = grid
    pixels = rng.standard_normal((t * h * w, 3 * 2 * patch * patch)).astype(np.float32)
    digest = int.from_bytes(hashlib.blake2b(pixels.tobytes(), digest_size=8).digest()) >> 1
    return ImageIn(pixels.tobytes(), grid, digest)


def _prompt(rng, text_lens: list[int], images: list[ImageIn]) -> list[int]:
    """Text runs and images in turn: text_lens has one more entry than images."""
    ids: list[int] = []
    for i, n in enumerate(text_lens):
        ids += rng.integers(3, 100, n).tolist()
        if i < len(images):
            t, h, w = images[i].grid
            ids += [VL_START] + [VL_PAD] * (t * h * w // 4) + [VL_END]
    return ids


def workload(patch: int) -> list[tuple[list[int], list[ImageIn]]]:
    rng = np.random.default_rng(7)
    shapes = [
        [(1, 4, 6)],  # one small image
        [(1, 8, 8), (1, 4, 4)],  # two images, windows of several sizes
        [],  # text only, in the same batches
        [(1, 6, 10)],
        [(2, 4, 4)],  # two frames: temporal positions
    ]
    items = []
    for i, grids in enumerate(shapes):
        images = [_image(rng, g, patch) for g in grids]
        items.append((_prompt(rng, [5 + i] + [3 + i] * len(images), images), images))
    return items


def _pixels(images: list[ImageIn]) -> torch.Tensor | None:
    if not images:
        return None
    # a copy: torch warns of tensors over read-only memory (the message's bytes)
    return torch.cat(
        [torch.from_numpy(np.frombuffer(im.pixels, np.float32).copy()) for im in images]
    )


def run(engine: Engine, items) -> list[list[int]]:
    params = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
    states = [engine.submit(ids, params, images=images) for ids, images in items]
    engine.wait(states)
    return [s.output_ids for s in states]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request, tmp_path_factory):
    path = make_vl_checkpoint(str(tmp_path_factory.mktemp(request.param)), request.param)
    patch = 16 if request.param == "qwen3_vl" else 14
    items = workload(patch)
    prompts = []
    for ids, images in items:
        dim = 3 * 2 * patch * patch
        pixels = _pixels(images)
        prompts.append(
            (ids, None if pixels is None else pixels.view(-1, dim), [im.grid for im in images])
        )
    return path, items, hf_vl_greedy(path, prompts, NEW)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"chunked_prefill_size": 16},  # chunk boundaries inside images
        {"pp_size": 2},
        {"pp_size": 3, "pp_layer_partition": "1,1,2"},  # DeepStack features travel two stages
        {"pp_size": 2, "tp_size": 2, "pp_layer_partition": "1,3"},  # DeepStack across, TP
    ],
    ids=["pp1", "pp1-chunked", "pp2", "pp3", "pp2xtp2"],
)
def test_greedy_tokens_equal_transformers(family, extra):
    path, items, want = family
    with Engine(
        model_path=path, device="cpu", skip_tokenizer_init=True, cpu_threads=1, **extra
    ) as engine:
        assert run(engine, items) == want
        assert engine.stats["free_slots"] == engine.stats["num_slots"]


def test_prefix_cache_keys_image_tokens_by_the_image(family):
    """The same text with another image must not reuse the first image's KV (every image's tokens
    are the same pad id); the same image again does."""
    path, items, want = family
    ids, images = items[0]
    patch = 16 if "qwen3" in path else 14
    other = [_image(np.random.default_rng(99), images[0].grid, patch)]
    with Engine(model_path=path, device="cpu", skip_tokenizer_init=True, cpu_threads=1) as engine:
        params = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
        first = engine.submit(ids, params, images=images)
        engine.wait([first])
        changed = engine.submit(ids, params, images=other)
        engine.wait([changed])
        again = engine.submit(ids, params, images=images)
        engine.wait([again])
    assert first.output_ids == again.output_ids == want[0]
    start = ids.index(VL_PAD)
    assert changed.cached_tokens == start  # the text before the image only
    assert again.cached_tokens > start + images[0].grid[1] * images[0].grid[2] // 4
    dim = 3 * 2 * patch * patch
    ref = hf_vl_greedy(path, [(ids, _pixels(other).view(-1, dim), [other[0].grid])], NEW)
    assert changed.output_ids == ref[0]


def test_mismatched_images_are_the_requests_error_not_the_engines(family):
    path, items, _ = family
    ids, images = items[1]  # two images
    with Engine(model_path=path, device="cpu", skip_tokenizer_init=True, cpu_threads=1) as engine:
        params = {"temperature": 0, "max_new_tokens": 2}
        bad = [
            engine.submit(ids, params, images=images[:1]),  # one image for two placeholders
            engine.submit(ids, params, images=images[::-1]),  # runs of the wrong lengths
            engine.submit(ids, params, images=[images[0], ImageIn(b"xx", images[1].grid, 1)]),
        ]
        good = engine.submit(ids, params, images=images)
        engine.wait([*bad, good])
    assert "2 image placeholder(s) for 1 image(s)" in bad[0].error
    assert "placeholder tokens" in bad[1].error
    assert "bytes of patches" in bad[2].error
    assert good.error is None and len(good.output_ids) == 2


@cuda
def test_cuda_graphs_decode_multimodal_requests_as_transformers(family):
    """Decode graphs replay image requests' steps (their rotary runs behind their positions)."""
    path, items, want = family
    outs = {}
    for graphs in (True, False):
        with Engine(
            model_path=path,
            device="cuda",
            dtype="float32",
            skip_tokenizer_init=True,
            disable_cuda_graph=not graphs,
        ) as engine:
            outs[graphs] = run(engine, items)
    assert outs[True] == outs[False] == want


@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "cache-on"])
def test_preempted_image_requests_are_encoded_again_and_lose_nothing(family, cache):
    """A KV pool too small for the workload at once (each request alone fits): requests are
    preempted and readmitted, their images encoded again on readmission (with the cache: from
    where their cached prefix ends, which may be inside an image), with 8-token prefill chunks;
    the tokens stay transformers'."""
    path, items, want = family
    with Engine(
        model_path=path,
        device="cpu",
        skip_tokenizer_init=True,
        cpu_threads=1,
        max_total_tokens=64,
        chunked_prefill_size=8,
        disable_radix_cache=not cache,
    ) as engine:
        assert run(engine, items) == want
        assert engine.stats["num_preemptions"] > 0
        assert engine.stats["free_slots"] == engine.stats["num_slots"]


def test_deterministic_image_requests_are_the_same_alone_and_batched(family):
    """--deterministic, bf16: a request's tokens and logprobs do not depend on which other image
    and text requests share its steps (their images encoded in the same step, their rows in the
    same projections)."""
    path, items, _ = family
    params = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}

    def outcomes(engine: Engine, batch) -> list[tuple[list[int], list[float]]]:
        states = [engine.submit(ids, params, True, images=images) for ids, images in batch]
        engine.wait(states)
        return [(s.output_ids, s.logprobs) for s in states]

    with Engine(
        model_path=path,
        device="cpu",
        dtype="bfloat16",
        deterministic=True,
        disable_radix_cache=True,
        skip_tokenizer_init=True,
        cpu_threads=1,
    ) as engine:
        alone = [outcomes(engine, [item])[0] for item in items]
        together = outcomes(engine, items)
        reversed_ = outcomes(engine, items[::-1])[::-1]
    assert together == alone and reversed_ == alone
