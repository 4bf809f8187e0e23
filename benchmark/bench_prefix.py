"""The prefix cache on a shared-prefix workload, offline: G groups of requests, each group sharing a
prefix of P tokens followed by U unique tokens, N new tokens each; the same run with the cache on
and off (`disable_radix_cache`), output tok/s, the mean time to a request's first token, and the
hit rate (prompt tokens admitted from the cache over all prompt tokens admitted).

    python benchmark/bench_prefix.py --groups 16 --per-group 8 --prefix 200 --unique 8 --new 16
    python benchmark/bench_prefix.py --shape 8b --burst --groups 16 --per-group 64 \
        --prefix 2048 --unique 32 --new 64          # the GPU target of the prefix-cache issue

The embedded model by default (its context is 256 tokens); --model-path for another, --shape 8b
for bench_offline's random 8B shape (written to a temporary directory). By default the requests of
a group arrive together after the group's first request has finished, as a harness sending n-shot
prompts would: the first of each group fills the cache. `--burst`: every request at once, the
groups interleaved (concurrent users; the cache fills while the first prompts are prefilled).
The hit rate is over the shareable prompt tokens: every group's prefix but its first copy.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

from pipeserve import Engine


def workload(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], list[list[int]]]]:
    rng = random.Random(0)
    groups = []
    for _ in range(args.groups):
        prefix = [rng.randrange(4, vocab) for _ in range(args.prefix)]
        tails = [
            [rng.randrange(4, vocab) for _ in range(args.unique)] for _ in range(args.per_group)
        ]
        groups.append((prefix, [prefix + t for t in tails]))
    return groups


def run(args: argparse.Namespace, cache: bool) -> dict:
    params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": args.new}
    kwargs = {"device": args.device, "disable_radix_cache": not cache}
    if args.model_path:
        kwargs["model_path"] = args.model_path
    with Engine(**kwargs) as engine:
        groups = workload(args, engine.info.get("vocab_size", 128))
        warm = [3] * len(groups[0][1][0])  # the workload draws tokens from 4 up: shares nothing
        engine.generate(input_ids=[warm], sampling_params=params)
        start = time.perf_counter()
        if args.burst:
            firsts = []
            rest = [
                (ids, params)
                for i in range(args.per_group)
                for _, p in groups
                for ids in p[i : i + 1]
            ]
        else:
            firsts = engine.submit_many([(g[1][0], params) for g in groups])  # one per group
            engine.wait(firsts)
            rest = [(ids, params) for _, prompts in groups for ids in prompts[1:]]
        t0 = time.perf_counter()
        states = engine.submit_many(rest)
        first_token: dict[int, float] = {}
        while not all(s.finished for s in states):
            engine.poll(0.005)
            now = time.perf_counter()
            for i, s in enumerate(states):
                if s.output_ids and i not in first_token:
                    first_token[i] = now - t0
        wall = time.perf_counter() - start
        stats = dict(engine.stats)
    tokens = args.new * (len(firsts) + len(states))
    ttft = sorted(first_token.values())
    shareable = (args.per_group - 1) * args.groups * args.prefix
    return {
        "cache": cache,
        "output_tok_per_s": tokens / wall,
        "wall_s": wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))],
        "hit_rate": stats["num_cached_tokens"] / max(1, stats["num_admitted_tokens"]),
        "shareable_hit": stats["num_cached_tokens"] / shareable,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--unique", type=int, default=8)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--shape", choices=["8b"], default=None, help="a random-weight shape (GPU)")
    ap.add_argument("--burst", action="store_true", help="every request at once")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.shape:
        import torch

        from random_checkpoint import SHAPES, make_model

        args.device = "cuda"
        path = tempfile.mkdtemp(prefix="pipeserve-prefix-")
        args.model_path = make_model(path, SHAPES[args.shape], torch.bfloat16, "cuda")
        torch.cuda.empty_cache()
    rows = [run(args, cache) for cache in (True, False)]
    on, off = rows
    what = "every request" if args.burst else "the rest of each group"
    print(
        f"| cache | output tok/s | TTFT p50 / p99 s ({what}) | hit rate | of shareable | wall s |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {'on' if r['cache'] else 'off'} | {r['output_tok_per_s']:.0f} | "
            f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | {r['hit_rate']:.3f} | "
            f"{r['shareable_hit']:.3f} | {r['wall_s']:.2f} |"
        )
    print(
        f"on/off: throughput {on['output_tok_per_s'] / off['output_tok_per_s']:.2f}x, "
        f"TTFT p50 {on['ttft_p50_s'] / off['ttft_p50_s']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
