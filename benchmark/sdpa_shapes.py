"""Why the engine turns cuDNN attention off on CUDA: one SDPA call per new key length, as decode
makes (the key length grows by one every step), per backend set. CUDA only.

    python benchmark/sdpa_shapes.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "default order (cuDNN first)": [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ],
    "memory-efficient (the engine's choice)": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


def per_call_ms(backends: list[SDPBackend], lengths: range) -> float:
    """Median milliseconds of one decode-shaped SDPA call (8 KV heads, 4 grouped queries, a mask)."""
    q = torch.randn(1, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
    times = []
    with sdpa_kernel(backends):
        for length in lengths:
            k = torch.randn(1, 8, length, 64, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            mask = torch.zeros(1, 1, 1, length, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [
        {"backends": name, "ms_per_call": per_call_ms(b, range(64, 160))}
        for name, b in BACKENDS.items()
    ]
    print(f"{'backends':<40} {'ms per call (new key length each call)':>40}")
    for r in rows:
        print(f"{r['backends']:<40} {r['ms_per_call']:>40.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
