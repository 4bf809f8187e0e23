"""A pipeline job as a frozen dataclass tree: endpoints, columns and the retry policy.

The Python API builds these directly; `jobfile.load_job` builds the same objects from YAML.
Building a `Job` validates it (names, endpoints, the column graph) and raises `JobError` naming the
problem, so a job that exists is one the runner can execute.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeserve.pipeline.job.schema import SchemaError, check_schema
from pipeserve.pipeline.job.template import SYNTAXES, TemplateError, template_fields

APIS = ("completions", "chat")
# How an endpoint orders the `priority` request field: "auto" sends it lower-first to a server
# that says it is pipeserve (GET /models, owned_by) and not at all to any other.
PRIORITY_ORDERS = ("auto", "off", "lower-first", "higher-first")
# Request fields the runner sets itself; a column's `params` may not override them.
RUNNER_FIELDS = ("model", "prompt", "messages", "stream", "n", "priority", "response_format")


class JobError(ValueError):
    """A job description that cannot run; the message names the column, endpoint or key."""


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server. `base_url` ends where the OpenAI SDK's does (`.../v1`);
    requests go to `{base_url}/completions` or `{base_url}/chat/completions`."""

    name: str
    base_url: str
    model: str | None = None
    max_concurrency: int = 16  # requests in flight to this endpoint at most
    max_batch_size: int = 1  # prompts of one column per completions request (chat: always 1)
    api_key: str | None = None
    timeout_s: float = 300.0  # one attempt of one request
    priority: str = "auto"  # one of PRIORITY_ORDERS
    response_format: bool = False  # send structured columns' schemas (OpenAI, vLLM, SGLang)
    adaptive: bool = True  # halve the requests in flight on 429/503, grow back on success

    def __post_init__(self) -> None:
        _check_name(self.name, "endpoint")
        if self.priority not in PRIORITY_ORDERS:
            raise JobError(
                f"endpoint {self.name!r}: priority must be one of {PRIORITY_ORDERS}, "
                f"got {self.priority!r}"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise JobError(f"endpoint {self.name!r}: base_url must start with http:// or https://")
        if self.max_concurrency < 1 or self.max_batch_size < 1:
            raise JobError(
                f"endpoint {self.name!r}: max_concurrency and max_batch_size must be at least 1"
            )
        if self.timeout_s <= 0:
            raise JobError(f"endpoint {self.name!r}: timeout_s must be positive")


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per cell for 429, 5xx and connection errors; the wait before attempt k+1 is
    `min(max_backoff_s, backoff_s * 2**(k-1))`, or the server's Retry-After when it sends one."""

    max_attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 16.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise JobError("retry.max_attempts must be at least 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise JobError("retry.backoff_s and retry.max_backoff_s must not be negative")

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


@dataclass(frozen=True)
class LLMColumn:
    """A column whose cell is one request: `prompt` rendered over the record's fields and
    earlier columns (`{a}+{b}=`), sent to `endpoint` with `params` (max_tokens, temperature,
    stop, ...). `priority` (lower is scheduled earlier) goes to endpoints that take it; None
    derives it from the column's depth, so that later columns (judges) go before bulk
    generation.

    With `output_schema` (a JSON schema, see schema.py) the cell is the parsed object, and an
    answer that does not parse or validate is generated again, up to `max_generations` in all
    (validator columns share that bound). A generation cut at max_tokens (finish_reason
    "length") is a cell error unless `allow_truncated`."""

    name: str
    endpoint: str | tuple[str, ...]  # several: each cell goes to whichever has a free slot
    prompt: str
    api: Literal["completions", "chat"] = "completions"
    params: Mapping[str, Any] = field(default_factory=dict)
    priority: int | None = None
    system: str | None = None  # chat only: a system message, a template like `prompt`
    syntax: Literal["format", "jinja"] = "format"  # of `prompt` and `system` (template.py)
    output_schema: Mapping[str, Any] | None = None
    max_generations: int = 3
    allow_truncated: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name, "column")
        if not isinstance(self.endpoint, str):
            object.__setattr__(self, "endpoint", tuple(self.endpoint))
            if not self.endpoint:
                raise JobError(f"column {self.name!r}: endpoint lists no endpoint")
        if self.api not in APIS:
            raise JobError(f"column {self.name!r}: api must be one of {APIS}, got {self.api!r}")
        if self.syntax not in SYNTAXES:
            raise JobError(f"column {self.name!r}: syntax must be one of {SYNTAXES}")
        if self.system is not None and self.api != "chat":
            raise JobError(f"column {self.name!r}: a system prompt needs api: chat")
        if self.max_generations < 1:
            raise JobError(f"column {self.name!r}: max_generations must be at least 1")
        try:
            self.inputs  # noqa: B018 - parses the templates
            if self.output_schema is not None:
                check_schema(self.output_schema, "output_schema")
        except (TemplateError, SchemaError) as e:
            raise JobError(f"column {self.name!r}: {e}") from None
        taken = sorted(set(self.params) & set(RUNNER_FIELDS))
        if taken:
            raise JobError(
                f"column {self.name!r}: params may not set {', '.join(taken)} (the runner does)"
            )
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.endpoint,) if isinstance(self.endpoint, str) else self.endpoint

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every name the templates read: earlier columns and record fields."""
        names = template_fields(self.prompt, self.syntax)
        if self.system is not None:
            names += tuple(n for n in template_fields(self.system, self.syntax) if n not in names)
        return names


@dataclass(frozen=True)
class PythonColumn:
    """A column computed in-process: `function(row)` where `row` holds the record's fields and the
    values of the `inputs` columns. It runs on the event loop, so it should be quick.

    A validator (`validates` names an LLM column, which becomes one of its inputs) returns True
    to accept that column's cell, or False or a reason (a string) to have it generated again,
    within that column's `max_generations`; its own cell is then True, or the error naming the
    last reason. Columns that read the validated column wait for its validators."""

    name: str
    function: Callable[[dict[str, Any]], Any]
    inputs: tuple[str, ...] = ()
    validates: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "column")
        if not callable(self.function):
            raise JobError(f"column {self.name!r}: function is not callable")
        inputs = tuple(self.inputs)
        if self.validates is not None and self.validates not in inputs:
            inputs += (self.validates,)
        object.__setattr__(self, "inputs", inputs)


Column = LLMColumn | PythonColumn


@dataclass(frozen=True)
class StopPolicy:
    """Early stop: the run ends when at least `error_rate` of the last `window` cells that ran
    failed (cells not run because an input failed do not count). Records not finished are not
    written; a re-run resumes them."""

    error_rate: float = 0.5
    window: int = 50
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.error_rate <= 1 or self.window < 1:
            raise JobError("stop.error_rate must be in (0, 1] and stop.window at least 1")


@dataclass(frozen=True)
class Job:
    """Columns over records. `fields`, when given, declares the records' fields, so that a
    template naming neither a column nor a field fails here rather than at the first record."""

    endpoints: tuple[Endpoint, ...]
    columns: tuple[Column, ...]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fields: tuple[str, ...] | None = None
    stop: StopPolicy = field(default_factory=StopPolicy)
    graph: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from pipeserve.pipeline.job.dag import build_graph

        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        object.__setattr__(self, "columns", tuple(self.columns))
        if self.fields is not None:
            object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "graph", build_graph(self))

    def endpoint(self, name: str) -> Endpoint:
        return next(e for e in self.endpoints if e.name == name)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def with_endpoint_urls(self, urls: Mapping[str, str]) -> Job:
        """The same job with some endpoints' base_url replaced (the CLI's --endpoint)."""
        unknown = sorted(set(urls) - {e.name for e in self.endpoints})
        if unknown:
            raise JobError(f"--endpoint names unknown endpoint(s): {', '.join(unknown)}")
        endpoints = tuple(
            Endpoint(**{**vars(e), "base_url": urls.get(e.name, e.base_url)})
            for e in self.endpoints
        )
        return Job(endpoints, self.columns, self.retry, self.fields, self.stop)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise JobError(
            f"{what} name {name!r} must be an identifier not starting with '_' "
            "(it is used in templates and as an output key)"
        )
