#!/usr/bin/env python3
"""Held-out exact match of the embedded vision-language model (default-vl) served by pipeserve
itself, on examples/arith_vl/arith_vl_heldout.jsonl: through a running server, or the offline Engine.

    python -m pipeserve.launch_server --model-path default-vl &
    python scripts/eval_default_vl.py --url http://127.0.0.1:30000 [--limit 200]
    python scripts/eval_default_vl.py --engine [--pp-size 2] [--limit 200]

Each problem is one user message [image_url (the PNG data URL), text ""], as lmms-eval's
openai_compatible model sends the task in examples/arith_vl/lmms; greedy, at most 8 new tokens.
--answers-out writes the per-problem answers (to compare runs, e.g. pp=1 against pp=2).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HELDOUT_FILE = (
    Path(__file__).resolve().parents[1] / "examples" / "arith_vl" / "arith_vl_heldout.jsonl"
)


def content(row: dict) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": row["image"]}}, {"type": "text", "text": ""}]


def ask_server(url: str, model: str, row: dict) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content(row)}],
        "temperature": 0,
        "max_tokens": 8,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)["choices"][0]["message"]["content"]


def server_answers(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    with ThreadPoolExecutor(args.concurrency) as pool:
        return list(pool.map(lambda row: ask_server(args.url, args.model, row), rows))


def engine_answers(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    from pipeserve import Engine

    with Engine(model_path="default-vl", pp_size=args.pp_size, device="cpu") as engine:
        tok = engine.tokenizer
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
        text = tok.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        outs = engine.generate(
            input_ids=[ids] * len(rows),
            sampling_params={"temperature": 0, "max_new_tokens": 8},
            image_data=[row["image"] for row in rows],
        )
        return [out["text"] for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    route = parser.add_mutually_exclusive_group(required=True)
    route.add_argument("--url", help="a server serving default-vl")
    route.add_argument("--engine", action="store_true", help="the offline Engine on CPU")
    parser.add_argument("--model", default="pipeserve-default-vl", help="the server's model name")
    parser.add_argument("--pp-size", type=int, default=1, help="--engine: pipeline stages")
    parser.add_argument("--heldout-file", type=Path, default=HELDOUT_FILE)
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    parser.add_argument("--concurrency", type=int, default=8, help="--url: requests in flight")
    parser.add_argument("--answers-out", type=Path, default=None)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.heldout_file.read_text().splitlines()][: args.limit]
    start = time.perf_counter()
    answers = engine_answers(args, rows) if args.engine else server_answers(args, rows)
    seconds = time.perf_counter() - start
    if args.answers_out is not None:
        with args.answers_out.open("w") as f:
            for row, got in zip(rows, answers, strict=True):
                f.write(json.dumps({"problem": row["problem"], "answer": got}) + "\n")
    misses = [
        (row["problem"], got)
        for row, got in zip(rows, answers, strict=True)
        if got.strip() != row["answer"]
    ]
    correct = len(rows) - len(misses)
    where = args.url or f"Engine pp={args.pp_size}"
    print(
        f"{where}: {correct}/{len(rows)} = {correct / len(rows):.4f} exact match ({seconds:.1f}s)"
    )
    print("missed:", " ".join(f"{p}->{g!r}" for p, g in misses[:20]))


if __name__ == "__main__":
    main()
