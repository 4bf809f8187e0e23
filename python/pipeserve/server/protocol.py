"""Parsing and validating the request bodies of the OpenAI and SGLang endpoints.

Every problem becomes an ApiError (HTTP 400 unless said otherwise) naming the offending field, in
OpenAI's error shape. Fields this server does not know are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeserve.engine.sampling_params import SamplingParams


class ApiError(Exception):
    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (
            message,
            param,
            status,
            code,
            kind,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Job:
    """One parsed request: prompts as token ids, and how to sample and report them."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    logprobs: int | None = None  # top logprobs per token; 0 = only the chosen token's
    include_usage: bool = False  # streaming: a last chunk with usage (OpenAI's stream_options)

    @property
    def num_requests(self) -> int:
        """Engine requests this job becomes: every choice of every prompt."""
        return len(self.prompts) * self.n


_MISSING = object()


def get(body: dict, name: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """body[name] checked against `types` (bool is never an int here); None means absent."""
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise ApiError(f"'{name}' is required", name)
        return default
    allowed = types if isinstance(types, tuple) else (types,)
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in allowed) or not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ApiError(f"'{name}' must be of type {names}, got {type(value).__name__}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(f"'{name}' must be a finite number", name)
    return value


def number_in(body: dict, name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = get(body, name, (int, float), default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def check_model(body: dict, served: set[str], name: str) -> None:
    """`served`: every name the model answers to; `name`: the one the server reports."""
    model = get(body, "model", str, None)
    if model is not None and model not in served:
        raise ApiError(
            f"The model '{model}' does not exist; this server serves '{name}'",
            "model",
            status=404,
            code="model_not_found",
        )


def sampling_params(body: dict, max_tokens: int) -> SamplingParams:
    """The OpenAI sampling fields (and a few SGLang extensions) as SamplingParams."""
    stop = get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise ApiError(
            "'stop' must be a non-empty string or a list of at most 16 non-empty strings", "stop"
        )
    for unsupported in ("logit_bias", "suffix", "tools", "functions"):
        if body.get(unsupported):
            raise ApiError(f"'{unsupported}' is not supported by this server", unsupported)
    if get(body, "echo", bool, False):
        raise ApiError(
            "'echo' is not supported by this server (prompt logprobs are not returned)", "echo"
        )
    top_p, top_k = number_in(body, "top_p", 0.0, 1.0, 1.0), get(body, "top_k", int, -1)
    if top_p == 0:  # OpenAI accepts 0: only the most likely token survives, as with top_k = 1
        top_p, top_k = 1.0, 1
    fields = {
        "max_new_tokens": max_tokens,
        "temperature": number_in(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": top_p,
        "top_k": top_k,
        "min_p": number_in(body, "min_p", 0.0, 1.0, 0.0),
        "frequency_penalty": number_in(body, "frequency_penalty", -2.0, 2.0, 0.0),
        "presence_penalty": number_in(body, "presence_penalty", -2.0, 2.0, 0.0),
        "repetition_penalty": get(body, "repetition_penalty", (int, float), 1.0),
        "seed": get(body, "seed", int, None),
        "stop": stop,
        "stop_token_ids": get(body, "stop_token_ids", list, []),
        "ignore_eos": get(body, "ignore_eos", bool, False),
        "skip_special_tokens": get(body, "skip_special_tokens", bool, True),
    }
    try:
        return SamplingParams.from_dict(fields)
    except ValueError as e:
        name = next((k for k in fields if str(e).startswith(k)), None)
        public = {"max_new_tokens": "max_tokens"}.get(name, name)
        raise ApiError(str(e).replace("max_new_tokens", "max_tokens"), public) from None


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream = get(body, "stream", bool, False)
    options = get(body, "stream_options", dict, {})
    return stream, bool(options.get("include_usage", False))


def choices(body: dict) -> int:
    n = get(body, "n", int, 1)
    if not 1 <= n <= 16:
        raise ApiError(f"'n' must be between 1 and 16, got {n}", "n")
    best_of = get(body, "best_of", int, n)
    if best_of != n:
        raise ApiError("'best_of' other than n is not supported", "best_of")
    return n


def token_lists(value: Any, name: str, vocab_size: int) -> list[list[int]]:
    """A prompt given as token ids: a list of ints, or a list of such lists."""
    lists = value if value and all(isinstance(v, list) for v in value) else [value]
    for ids in lists:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(f"'{name}' must be a non-empty list of token ids", name)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(f"'{name}' holds token id {bad[0]} outside [0, {vocab_size})", name)
    return lists


def check_context(prompt_len: int, max_tokens: int, context_length: int, param: str) -> None:
    if prompt_len + max_tokens > context_length:
        raise ApiError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or the completion length.",
            param,
            code="context_length_exceeded",
        )
