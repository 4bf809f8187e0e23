"""Writes arithmetic records `{"id", "a", "b"}` as JSON lines for the example job.

    python examples/pipeline/make_records.py --n 2000 --seed 0 > records.jsonl

Operands are drawn from 0..499, so that `a+b` (at most 998) is again an operand the embedded model
was trained on (0..999) when the judge computes `{sum}-{b}`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys


def make_records(n: int, seed: int = 0) -> list[dict[str, int]]:
    rng = random.Random(seed)
    return [{"id": i, "a": rng.randrange(500), "b": rng.randrange(500)} for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20, help="number of records")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for record in make_records(args.n, args.seed):
        sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
