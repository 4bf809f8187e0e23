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
    """Fills every parameter of `model`; raises naming any parameter the checkpoint did not provide."""
    loaded: set[int] = set()
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
                    loaded.add(id(getattr(module, param)))
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded]
    if missing:
        raise ValueError(f"checkpoint {model_path!r} lacks weights for: {', '.join(missing[:8])}")
