"""Loads a stage's weights from a Hugging Face directory: only the tensors (and, under TP, only the
rows or columns) this rank owns are read."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable

import torch
from safetensors import safe_open

from pipeserve.model.llama import DecoderForCausalLM


def safetensors_files(model_path: str) -> list[str]:
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_path, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path!r}")
    return files


@torch.no_grad()
def load_weights(
    model: DecoderForCausalLM, model_path: str, progress: Callable[[str], None] | None = None
) -> None:
    """Fills every parameter of `model`; raises naming any tensor the checkpoint did not provide
    (a merged parameter such as qkv_proj needs every one of its shards)."""
    loaded: dict[int, set[int]] = {}  # parameter -> shards loaded
    files = safetensors_files(model_path)
    for i, path in enumerate(files):
        if progress is not None:
            progress(f"loading weights {i + 1}/{len(files)}: {os.path.basename(path)}")
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                targets = model.weight_targets(name)
                if not targets:
                    continue
                lazy = f.get_slice(name)
                for module, param, shard in targets:
                    module.load(param, lazy, shard)
                    loaded.setdefault(id(getattr(module, param)), set()).add(shard)
    missing = [
        model.checkpoint_name(f"{prefix}.{param}".lstrip("."), shard)
        for prefix, module in model.named_modules()
        for param, p in module.named_parameters(recurse=False)
        for shard in range(num_shards(module))
        if shard not in loaded.get(id(p), ())
    ]
    if missing:
        raise ValueError(
            f"checkpoint {model_path!r} lacks {len(missing)} tensor(s): {', '.join(missing[:8])}"
        )


def num_shards(module: torch.nn.Module) -> int:
    """Checkpoint tensors that fill each parameter of `module` (q, k, v into qkv_proj: 3)."""
    return len(getattr(module, "local_sizes", [0]))
