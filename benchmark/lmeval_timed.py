"""lm-eval's CLI, unchanged, that also times its generate_until phase (the requests to the server,
without lm-eval's start-up and task loading) and appends the seconds to $GEN_TIME_FILE.

    GEN_TIME_FILE=/tmp/gen_s.txt python benchmark/lmeval_timed.py run --model local-completions ...

Takes the same arguments as `lm-eval`; used for the few-shot run in docs/benchmarks-log.md.
"""

from __future__ import annotations

import os
import sys
import time

from lm_eval.__main__ import cli_evaluate
from lm_eval.models import api_models

_generate_until = api_models.TemplateAPI.generate_until


def _timed(self, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return _generate_until(self, *args, **kwargs)
    finally:
        with open(os.environ["GEN_TIME_FILE"], "a") as f:
            f.write(f"{time.perf_counter() - t0:.4f}\n")


if __name__ == "__main__":
    api_models.TemplateAPI.generate_until = _timed
    sys.argv[0] = "lm-eval"
    sys.exit(cli_evaluate())
