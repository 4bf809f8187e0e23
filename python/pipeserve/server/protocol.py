"""Parsing and validating the request bodies of the OpenAI and SGLang endpoints.

Every problem becomes an ApiError (HTTP 400 unless said otherwise) naming the offending field, in
OpenAI's error shape. Fields this server does not know are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pipeserve.ipc.messages import ImageIn
from pipeserve.sampling_params import MAX_N, SamplingParams, SamplingParamsError, show


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
    priority: int = 0  # lower is admitted first (SGLang's and vLLM's `priority` field)
    # per prompt, its images (their tokens in the prompt already); empty: none anywhere
    images: list[list[ImageIn]] = field(default_factory=list)

    def images_of(self, prompt: int) -> list[ImageIn]:
        return self.images[prompt] if self.images else []

    @property
    def num_requests(self) -> int:
        """Engine requests this job becomes: every choice of every prompt."""
        return len(self.prompts) * self.n


_MISSING = object()
MAX_LOGPROBS = 20  # top logprobs per token
MAX_PROMPTS = 2048  # prompts in one request's list
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class HugeInt:
    """A JSON integer past Python's digit limit (`sys.get_int_max_str_digits`): parsed as this
    marker, which no field accepts, so that the error can name the field."""

    def __init__(self, digits: str) -> None:
        self.num_digits = len(digits.lstrip("-"))
        self.negative = digits.startswith("-")

    def __repr__(self) -> str:
        return f"{'a negative' if self.negative else 'an'} integer of {self.num_digits} digits"


def _int_or_marker(digits: str) -> int | HugeInt:
    try:
        return int(digits)
    except ValueError:
        return HugeInt(digits)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; every failure an ApiError."""
    try:
        body = _loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:  # an integer past the digit limit: parse again, marking it
        return json.loads(raw, parse_int=_int_or_marker)


def get(body: dict, name: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """body[name] checked against `types` (bool is never an int here); None means absent."""
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise ApiError(f"'{name}' is required", name)
        return default
    if isinstance(value, HugeInt):
        raise ApiError(f"'{name}' is out of range: {value!r}", name)
    allowed = types if isinstance(types, tuple) else (types,)
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in allowed) or not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ApiError(f"'{name}' must be of type {names}, got {type(value).__name__}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(f"'{name}' must be a finite number", name)
    return value


def number_in(body: dict, name: str, lo: float, hi: float, default: float | None) -> Any:
    """An int or float field within [lo, hi] (compared exactly: a huge int is out, not an error)."""
    value = get(body, name, (int, float), default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(f"'{name}' must be between {lo:g} and {hi:g}, got {show(value)}", name)
    return value


def int_in(body: dict, name: str, lo: int, hi: int, default: int | None) -> Any:
    value = get(body, name, int, default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(f"'{name}' must be between {lo} and {hi}, got {show(value)}", name)
    return value


PRIORITY_BOUND = 2**31 - 1


def priority(body: dict) -> int:
    """The request's `priority`: lower is admitted first, ties in arrival order."""
    return int_in(body, "priority", -PRIORITY_BOUND, PRIORITY_BOUND, 0)


def check_model(body: dict, served: set[str], name: str) -> None:
    """`served`: every name the model answers to; `name`: the one the server reports."""
    model = get(body, "model", str, None)
    if model is not None and model not in served:
        raise ApiError(
            f"The model '{model[:100]}' does not exist; this server serves '{name}'",
            "model",
            status=404,
            code="model_not_found",
        )


# OpenAI's names of the SamplingParams fields that differ
_PUBLIC = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def sampling_params(body: dict, max_tokens: int, vocab_size: int) -> SamplingParams:
    """The OpenAI sampling fields (and a few SGLang extensions) as SamplingParams."""
    stop = get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError("'stop' must be a non-empty string or a list of non-empty strings", "stop")
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
        "min_new_tokens": get(body, "min_tokens", int, 0),
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
    params = checked_params(fields, _PUBLIC)
    check_stop_ids(params, vocab_size, "stop_token_ids")
    return params


def checked_params(fields: Any, rename: dict[str, str], prefix: str = "") -> SamplingParams:
    """SamplingParams.from_dict(fields), its error an ApiError naming the field as the client
    wrote it: `prefix` + the field's name, renamed by `rename`."""
    try:
        return SamplingParams.from_dict(fields)
    except SamplingParamsError as e:
        message = str(e)
        for internal, public in rename.items():
            message = message.replace(internal, public)
        raise ApiError(message, prefix + rename.get(e.field, e.field)) from None


def check_stop_ids(params: SamplingParams, vocab_size: int, param: str) -> None:
    bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
    if bad is not None:
        raise ApiError(f"'{param}' holds token id {bad} outside [0, {vocab_size})", param)


def stream_flags(body: dict) -> tuple[bool, bool]:
    """`stream`, and `stream_options.include_usage` (allowed only with `stream`, as OpenAI)."""
    stream = get(body, "stream", bool, False)
    options = get(body, "stream_options", dict, None)
    if options is None:
        return stream, False
    if not stream:
        raise ApiError("'stream_options' is only allowed with 'stream': true", "stream_options")
    return stream, get(options, "include_usage", bool, False)


def choices(body: dict) -> int:
    n = int_in(body, "n", 1, MAX_N, 1)
    best_of = get(body, "best_of", int, n)
    if best_of != n:
        raise ApiError("'best_of' other than n is not supported", "best_of")
    return n


def logprobs_count(body: dict, name: str, default: int | None) -> int | None:
    return int_in(body, name, 0, MAX_LOGPROBS, default)


def token_lists(value: Any, name: str, vocab_size: int) -> list[list[int]]:
    """A prompt given as token ids: a list of ints, or a list of such lists."""
    lists = value if value and all(isinstance(v, list) for v in value) else [value]
    check_prompt_count(lists, name)
    for ids in lists:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(f"'{name}' must be a non-empty list of token ids", name)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(f"'{name}' holds token id {show(bad)} outside [0, {vocab_size})", name)
    return lists


def check_prompt_count(prompts: list, name: str) -> None:
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(f"'{name}' holds {len(prompts)} prompts; the bound is {MAX_PROMPTS}", name)


@dataclass(frozen=True)
class Capacity:
    """What one sequence may use: the context length and the KV pool (slots on every stage)."""

    context_length: int
    kv_slots: int

    def check(self, prompt_len: int, max_tokens: int, param: str) -> None:
        """Refuses a prompt + completion that cannot fit, naming the limit: the completion is never
        cut short silently."""
        if prompt_len + max_tokens > self.context_length:
            raise ApiError(
                f"This model's maximum context length is {self.context_length} tokens. However, "
                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or the completion "
                "length.",
                param,
                code="context_length_exceeded",
            )
        if prompt_len + max_tokens > self.kv_slots:
            raise ApiError(
                f"The KV cache pool holds {self.kv_slots} tokens; this request needs "
                f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or the completion length.",
                param,
                code="kv_pool_exceeded",
            )

    @property
    def max_sequence(self) -> int:
        return min(self.context_length, self.kv_slots)
