"""Reads a job from YAML into the same `Job` the Python API builds.

    endpoints:
      adder: {base_url: "http://127.0.0.1:30001/v1", model: pipeserve-default, max_concurrency: 16}
    columns:                      # in order; a column may read only columns (any order) and fields
      sum: {endpoint: adder, prompt: "{a}+{b}=", params: {max_tokens: 8, temperature: 0}}
      verified: {python: "checks:verified", inputs: [sum]}
    retry: {max_attempts: 5, backoff_s: 0.5, max_backoff_s: 16}    # optional
    stop: {error_rate: 0.5, window: 50}                             # optional
    fields: [a, b]                                                  # optional

A Python column names its function as `module:function`; the job file's directory is searched
first, so a module beside the job file is found.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import yaml

from pipeserve.pipeline.job.config import (
    Endpoint,
    Job,
    JobError,
    LLMColumn,
    PythonColumn,
    RetryPolicy,
    StopPolicy,
)

TOP_KEYS = {"endpoints", "columns", "retry", "fields", "stop"}
ENDPOINT_KEYS = {"base_url": str, "model": str, "max_concurrency": int, "max_batch_size": int}
ENDPOINT_KEYS.update(api_key=str, timeout_s=float, priority=str, response_format=bool)
ENDPOINT_KEYS.update(adaptive=bool)
LLM_KEYS = {"endpoint": (str, list), "prompt": str, "api": str, "params": dict, "priority": int}
LLM_KEYS.update(system=str, syntax=str, output_schema=dict, max_generations=int)
LLM_KEYS.update(allow_truncated=bool)
PYTHON_KEYS = {"python": str, "inputs": list, "validates": str}
RETRY_KEYS = {"max_attempts": int, "backoff_s": float, "max_backoff_s": float}
STOP_KEYS = {"error_rate": float, "window": int, "enabled": bool}


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_job(path: str) -> Job:
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except OSError as e:
        raise JobError(f"cannot read job file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise JobError(f"{path}: not valid YAML: {e}") from None
    try:
        return job_from_dict(data, base_dir=os.path.dirname(os.path.abspath(path)))
    except JobError as e:
        raise JobError(f"{path}: {e}") from None


def job_from_dict(data: Any, base_dir: str | None = None) -> Job:
    top = _mapping(data, "the job", TOP_KEYS, required=("endpoints", "columns"))
    endpoints = [
        Endpoint(name, **_typed(spec, f"endpoints.{name}", ENDPOINT_KEYS, ("base_url",)))
        for name, spec in _mapping(top["endpoints"], "endpoints").items()
    ]
    columns = [
        _column(str(name), spec, base_dir)
        for name, spec in _mapping(top["columns"], "columns").items()
    ]
    retry = RetryPolicy(**_typed(top.get("retry") or {}, "retry", RETRY_KEYS, ()))
    stop = StopPolicy(**_typed(top.get("stop") or {}, "stop", STOP_KEYS, ()))
    fields = top.get("fields")
    if fields is not None and not (
        isinstance(fields, list) and all(isinstance(f, str) for f in fields)
    ):
        raise JobError("fields: expected a list of names")
    fields = None if fields is None else tuple(fields)
    return Job(tuple(endpoints), tuple(columns), retry, fields, stop)


def _column(name: str, spec: Any, base_dir: str | None) -> LLMColumn | PythonColumn:
    where = f"columns.{name}"
    if isinstance(spec, dict) and "python" in spec:
        kw = _typed(spec, where, PYTHON_KEYS, ("python",))
        inputs = kw.get("inputs", [])
        if not all(isinstance(i, str) for i in inputs):
            raise JobError(f"{where}.inputs: expected a list of column names")
        function = resolve_function(kw["python"], base_dir, where)
        return PythonColumn(name, function, tuple(inputs), kw.get("validates"))
    kw = _typed(spec, where, LLM_KEYS, ("endpoint", "prompt"))
    if isinstance(kw["endpoint"], list):
        if not all(isinstance(e, str) for e in kw["endpoint"]):
            raise JobError(f"{where}.endpoint: expected a name or a list of names")
        kw["endpoint"] = tuple(kw["endpoint"])
    return LLMColumn(name, **kw)


def resolve_function(spec: str, base_dir: str | None, where: str) -> Callable[..., Any]:
    """Imports `module:function`, looking in `base_dir` before the rest of sys.path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise JobError(f"{where}.python: expected 'module:function', got {spec!r}")
    if base_dir is not None and base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise JobError(f"{where}.python: cannot import module {module_name!r}: {e}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise JobError(f"{where}.python: module {module_name!r} has no function {attr!r}")
    return function


def _mapping(
    data: Any, where: str, allowed: set[str] | None = None, required: tuple[str, ...] = ()
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise JobError(f"{where}: expected a mapping, got {type(data).__name__}")
    if allowed is not None:
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise JobError(
                f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
            )
    for key in required:
        if key not in data:
            raise JobError(f"{where}: missing key {key!r}")
    return data


def _typed(
    data: Any, where: str, types: dict[str, Any], required: tuple[str, ...]
) -> dict[str, Any]:
    """`data` checked against `types` (a type or a tuple of types; ints are accepted where
    floats are; null means unset)."""
    out = {k: v for k, v in _mapping(data, where, set(types)).items() if v is not None}
    _mapping(out, where, required=required)
    for key, value in out.items():
        want = types[key] if isinstance(types[key], tuple) else (types[key],)
        ok = isinstance(value, want) or (float in want and isinstance(value, int))
        if not ok or (bool not in want and isinstance(value, bool)):
            names = " or ".join(w.__name__ for w in want)
            raise JobError(f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r}")
    return out
