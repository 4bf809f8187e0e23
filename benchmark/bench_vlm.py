"""Multimodal serving speed: requests with one image each through the offline Engine, on a Qwen2.5-VL
shape of random weights; throughput, time to first token, and the vision tower's time per image.

    python benchmark/bench_vlm.py --shape vl8b|vlcpu [--pp 1,2] [--requests 256] [--json PATH]

Every request: --text words of prompt around one --image-size x --image-size image (448: a 32 x 32
patch grid, 256 image tokens), --new-tokens new tokens, greedy, ignore_eos; all submitted at once.
The tower's time per image is timed alone on stage 0's device (one batch of --tower-batch
images, synchronised) before the engine starts. pp sizes that need more GPUs than there are are
skipped (and said so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file

from pipeserve import Engine
from pipeserve.ipc.messages import ImageIn
from random_checkpoint import make_model

SHAPES = {  # language model as random_checkpoint's shapes, vision tower as Qwen2.5-VL's
    "vlcpu": dict(
        lm=dict(hidden=256, layers=4, inter=768, heads=4, kv=2, vocab=4096),
        vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4),
    ),
    "vl8b": dict(  # Qwen2.5-VL-7B: 28 layers of 3584, vision 32 blocks of 1280
        lm=dict(hidden=3584, layers=28, inter=18944, heads=28, kv=4, vocab=152064),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16),
    ),
}
IMAGE_TOKEN, START, END = 3, 4, 5  # token ids of the random model's image pad and its bounds


def make_vl_model(path: str, shape: dict, dtype: torch.dtype, device: str) -> str:
    """bench_offline's random language model, turned into a Qwen2.5-VL checkpoint: q/k/v biases,
    a random vision tower (in a second safetensors file) and the multimodal config."""
    lm = shape["lm"]
    make_model(path, lm, dtype, device)
    vc = {
        **shape["vision"],
        "out_hidden_size": lm["hidden"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": list(range(7, shape["vision"]["depth"], 8)),
        "hidden_act": "silu",
        "in_channels": 3,
    }
    gen = torch.Generator(device=device).manual_seed(1)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * 0.02).to(dtype).contiguous()

    d, inter, out = vc["hidden_size"], vc["intermediate_size"], vc["out_hidden_size"]
    t = {"visual.patch_embed.proj.weight": rand(d, 3, 2, 14, 14)}
    for i in range(vc["depth"]):
        p = f"visual.blocks.{i}."
        for name, size in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d))):
            t |= {p + name + ".weight": rand(*size), p + name + ".bias": rand(size[0])}
        for name, size in (
            ("gate_proj", (inter, d)),
            ("up_proj", (inter, d)),
            ("down_proj", (d, inter)),
        ):
            t |= {p + f"mlp.{name}.weight": rand(*size), p + f"mlp.{name}.bias": rand(size[0])}
        t |= {p + "norm1.weight": rand(d) + 1, p + "norm2.weight": rand(d) + 1}
    w = 4 * d
    t |= {"visual.merger.ln_q.weight": rand(d) + 1}
    t |= {"visual.merger.mlp.0.weight": rand(w, w), "visual.merger.mlp.0.bias": rand(w)}
    t |= {"visual.merger.mlp.2.weight": rand(out, w), "visual.merger.mlp.2.bias": rand(out)}
    h, heads, kv = lm["hidden"], lm["heads"], lm["kv"]
    for i in range(lm["layers"]):
        for name, n in (("q_proj", h), ("k_proj", kv * h // heads), ("v_proj", kv * h // heads)):
            t[f"model.layers.{i}.self_attn.{name}.bias"] = rand(n)
    save_file(t, os.path.join(path, "vision.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    half = h // heads // 2
    config |= {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "rope_scaling": {
            "type": "mrope",
            "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8],
        },
        "vision_config": vc,
        "image_token_id": IMAGE_TOKEN,
        "vision_start_token_id": START,
        "vision_end_token_id": END,
    }
    sec = config["rope_scaling"]["mrope_section"]
    sec[0] += half - sum(sec)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    clip = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    prep = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2}
    prep |= {"temporal_patch_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}
    prep |= {"image_mean": clip[0], "image_std": clip[1]}  # Qwen2.5-VL's own
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(prep, f)
    return path


def image(size: int, seed: int) -> ImageIn:
    """A random preprocessed image of size x size pixels (the patches the processor would give)."""
    g = size // 14
    pixels = np.random.default_rng(seed).standard_normal((g * g, 3 * 2 * 14 * 14), np.float32)
    digest = int.from_bytes(hashlib.blake2b(pixels.tobytes(), digest_size=8).digest()) >> 1
    return ImageIn(pixels.tobytes(), (1, g, g), digest)


def request(size: int, words: int, vocab: int, seed: int) -> tuple[list[int], ImageIn]:
    rng = np.random.default_rng(seed)
    img = image(size, seed)
    tokens = (size // 28) ** 2
    ids = rng.integers(10, vocab, words // 2).tolist() + [START] + [IMAGE_TOKEN] * tokens + [END]
    return ids + rng.integers(10, vocab, words - words // 2).tolist(), img


def tower_time(path: str, dtype: torch.dtype, device: str, size: int, batch: int) -> float:
    """Seconds per image of the vision tower alone, one batch of `batch` images."""
    from safetensors import safe_open

    from pipeserve.model.config import ModelConfig
    from pipeserve.model.vision import VisionTower

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        tower = VisionTower(ModelConfig.from_dir(path).vision, False, torch.device(device))
    torch.set_default_dtype(previous)
    with safe_open(os.path.join(path, "vision.safetensors"), "pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            for module, param, shard in tower.weight_target(name.removeprefix("visual.")):
                module.load(param, f.get_slice(name), shard)
    imgs = [image(size, i) for i in range(batch)]
    pixels = torch.cat([torch.from_numpy(np.frombuffer(i.pixels, np.float32).copy()) for i in imgs])
    pixels = pixels.view(-1, tower.patch_dim).to(device)
    grids = [i.grid for i in imgs]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(4):
            sync()
            start = time.perf_counter()
            tower(pixels, grids)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) / batch


def serve(path: str, pp: int, items: list, new: int, device: str, extra: dict) -> dict:
    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    with Engine(model_path=path, device=device, pp_size=pp, skip_tokenizer_init=True, **extra) as e:
        warm = e.submit(items[0][0], {**params, "max_new_tokens": 4}, images=[items[0][1]])
        e.wait([warm])
        start = time.perf_counter()
        states = [e.submit(ids, params, images=[img]) for ids, img in items]
        first: dict[int, float] = {}
        while any(s.finish_reason is None and s.error is None for s in states):
            e.poll(0.002)
            now = time.perf_counter()
            for i, s in enumerate(states):
                if i not in first and s.output_ids:
                    first[i] = now - start
        wall = time.perf_counter() - start
    errors = [s.error for s in states if s.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    tokens = sum(len(s.output_ids) for s in states)
    ttft = sorted(first.values())
    return {
        "pp": pp,
        "requests": len(items),
        "output_tok_s": tokens / wall,
        "wall_s": wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="vlcpu")
    ap.add_argument("--model-path", help="reuse a checkpoint written by an earlier run")
    ap.add_argument("--pp", default="1,2")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--text", type=int, default=24, help="prompt text tokens around the image")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--tower-batch", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    tmp = tempfile.mkdtemp(prefix="pipeserve-vlm-")
    path = args.model_path or make_vl_model(tmp, shape, dtype, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    per_image = tower_time(path, dtype, device, args.image_size, args.tower_batch)
    items = [
        request(args.image_size, args.text, shape["lm"]["vocab"], i) for i in range(args.requests)
    ]
    extra = {"cpu_threads": 1} if device == "cpu" else {}
    rows = []
    for pp in (int(x) for x in args.pp.split(",")):
        if device == "cuda" and pp > torch.cuda.device_count():
            print(f"pp={pp}: skipped, {torch.cuda.device_count()} GPU(s) here")
            continue
        rows.append(serve(path, pp, items, args.new_tokens, device, extra))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{args.shape} on {gpu}: {args.requests} requests, one {args.image_size}px image each")
    print(f"vision tower: {per_image * 1e3:.2f} ms/image (batch {args.tower_batch})")
    print(f"{'pp':>3} {'output tok/s':>13} {'TTFT median s':>14} {'TTFT p90 s':>11} {'wall s':>8}")
    for r in rows:
        print(
            f"{r['pp']:>3} {r['output_tok_s']:>13.0f} {r['ttft_median_s']:>14.3f} "
            f"{r['ttft_p90_s']:>11.3f} {r['wall_s']:>8.2f}"
        )
    if len(rows) > 1:
        print(
            f"pp={rows[1]['pp']} / pp=1 throughput: {rows[1]['output_tok_s'] / rows[0]['output_tok_s']:.2f}x"
        )
    result = {"shape": args.shape, "device": gpu, "tower_s_per_image": per_image, "runs": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
