"""Sums a py-spy raw profile (`py-spy record --format raw`: one line per distinct stack, frames
joined by ';', then the sample count) into the share of samples per function: by own time (the
stack's last frame) and inclusive (any frame of the stack), line numbers dropped.

    python benchmark/spy_summary.py profile.txt --self 40 --inclusive 80
"""

from __future__ import annotations

import argparse
import collections
import re


def summarize(path: str) -> tuple[int, collections.Counter, collections.Counter]:
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    return total, own, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--self", dest="own", type=int, default=40, help="rows by own time")
    parser.add_argument("--inclusive", type=int, default=80, help="rows by inclusive time")
    args = parser.parse_args()
    total, own, inclusive = summarize(args.profile)
    print(f"samples: {total}")
    for title, counter, rows in (("own", own, args.own), ("inclusive", inclusive, args.inclusive)):
        print(f"\n| {title} % | function |\n|---|---|")
        for frame, n in counter.most_common(rows):
            print(f"| {100 * n / max(total, 1):.1f} | {frame} |")


if __name__ == "__main__":
    main()
