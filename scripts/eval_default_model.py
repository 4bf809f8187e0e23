#!/usr/bin/env python3
"""Held-out exact match of the embedded model served by pipeserve itself (not transformers).

    python scripts/eval_default_model.py [--pp-size 2] [--tp-size 1] [--limit N]

Same split and prompts as scripts/train_default_model.py --eval-only; greedy, at most 8 new tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeserve import Engine
from train_default_model import DEFAULT_OUT, answer, heldout_problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=str(DEFAULT_OUT))
    parser.add_argument("--pp-size", type=int, default=2)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out problems only")
    args = parser.parse_args()
    problems = heldout_problems()[: args.limit]
    params = {"temperature": 0, "max_new_tokens": 8}
    with Engine(
        model_path=args.model_path, pp_size=args.pp_size, tp_size=args.tp_size, device="cpu"
    ) as engine:
        tok = engine.tokenizer
        for fmt in ("chat", "raw"):
            if fmt == "chat":
                texts = [
                    tok.apply_chat_template(
                        [{"role": "user", "content": f"{a}{op}{b}"}],
                        add_generation_prompt=True,
                        tokenize=False,
                    )
                    for a, op, b in problems
                ]
                ids = [tok.encode(t, add_special_tokens=False) for t in texts]
            else:
                ids = [tok.encode(f"{a}{op}{b}=") for a, op, b in problems]
            start = time.perf_counter()
            outs = engine.generate(input_ids=ids, sampling_params=params)
            correct = sum(o["text"] == answer(*p) for o, p in zip(outs, problems, strict=True))
            print(
                f"{fmt:>4}: {correct}/{len(problems)} = {correct / len(problems):.4f} exact match ({time.perf_counter() - start:.1f}s, pp={args.pp_size}, tp={args.tp_size})"
            )


if __name__ == "__main__":
    main()
