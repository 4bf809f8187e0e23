"""Multi-model pipelines over OpenAI-compatible endpoints: columns over records, dispatched from
an incrementally maintained ready frontier (see docs/pipeline.md)."""

from pipeserve.pipeline.job.config import (
    Endpoint,
    Job,
    JobError,
    LLMColumn,
    PythonColumn,
    RetryPolicy,
    StopPolicy,
)
from pipeserve.pipeline.job.jobfile import job_from_dict, load_job
from pipeserve.pipeline.runner import run_job, run_job_async
from pipeserve.pipeline.stats import RunSummary

__all__ = [
    "Endpoint",
    "Job",
    "JobError",
    "LLMColumn",
    "PythonColumn",
    "RetryPolicy",
    "RunSummary",
    "StopPolicy",
    "job_from_dict",
    "load_job",
    "run_job",
    "run_job_async",
]
