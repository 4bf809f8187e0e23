"""The example job through the Python API: the same `Job` that job.yaml describes.

python examples/pipeline/job_api.py --output /tmp/pipeline_api_out.jsonl
"""

from __future__ import annotations

import argparse
import os

from checks import verified

from pipeserve.pipeline import Endpoint, Job, LLMColumn, PythonColumn, RetryPolicy, run_job

HERE = os.path.dirname(os.path.abspath(__file__))
PARAMS = {"max_tokens": 8, "temperature": 0, "stop": ["\n"]}

JOB = Job(
    endpoints=(
        Endpoint("adder", "http://127.0.0.1:30001/v1", "pipeserve-default", 8, max_batch_size=8),
        Endpoint("checker", "http://127.0.0.1:30002/v1", "pipeserve-default", 8, max_batch_size=8),
    ),
    columns=(
        LLMColumn("sum", "adder", "{a}+{b}=", params=PARAMS),
        LLMColumn("check", "checker", "{sum}-{b}=", params=PARAMS),
        PythonColumn("verified", verified, inputs=("check",)),
    ),
    retry=RetryPolicy(max_attempts=5, backoff_s=0.5, max_backoff_s=8),
    fields=("a", "b"),
)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=os.path.join(HERE, "records.jsonl"))
    p.add_argument("--output", required=True)
    args = p.parse_args()
    summary = run_job(JOB, args.input, args.output, progress=True)
    print(summary.format())
