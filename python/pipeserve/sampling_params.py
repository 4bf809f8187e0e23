"""Per-request sampling parameters with SGLang's names and defaults, validated on construction."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

_ALIASES = {"sampling_seed": "seed"}
_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "n")
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
_BOOL_FIELDS = (
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
)

MAX_N = 16  # choices per request
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
INT32_MAX = 2**31 - 1  # bound of the token counts, top_k and token ids
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as vLLM and torch generators take it

# (field, predicate, allowed range as written in the error message). Every field is bounded: the
# ranks put these values into int64 / float32 tensors, where an unbounded value overflows.
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("max_new_tokens", lambda v: 0 <= v <= INT32_MAX, f"in [0, {INT32_MAX}]"),
    # bounded: float32 turns a huge temperature into inf, and -inf logits / inf into NaN
    ("temperature", lambda v: 0 <= v <= 100, "in [0, 100] (0 means greedy)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("top_k", lambda v: -1 <= v <= INT32_MAX, f"-1 or 0 (disabled) or in [1, {INT32_MAX}]"),
    ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    # bounded away from 0: dividing logits by a tiny penalty overflows them to inf (NaN logprobs)
    ("repetition_penalty", lambda v: 0.01 <= v <= 100, "in [0.01, 100]"),
    ("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
    ("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
    ("n", lambda v: 1 <= v <= MAX_N, f"in [1, {MAX_N}]"),
)


class SamplingParamsError(ValueError):
    """A sampling parameter out of its type or range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. `from_dict` is the entry point for user input."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        _check_types(self)
        for name in _FLOAT_FIELDS:  # ints are accepted for float fields; store floats
            object.__setattr__(self, name, float(getattr(self, name)))
        _check_ranges(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SamplingParams:
        """Build from a JSON-like mapping; `None` values mean "default"."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise SamplingParamsError(
                "sampling_params", f"sampling params must be a mapping, got {type(d).__name__}"
            )
        _check_known_keys(d)
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = _ALIASES.get(key, key)
            if value is None:
                continue
            if name in kwargs:
                raise SamplingParamsError(
                    name, f"{name} is given twice (directly and through an alias)"
                )
            kwargs[name] = value
        if "stop" in kwargs:
            kwargs["stop"] = _as_tuple("stop", kwargs["stop"], scalar_type=str)
        if "stop_token_ids" in kwargs:
            kwargs["stop_token_ids"] = _as_tuple("stop_token_ids", kwargs["stop_token_ids"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain values that `from_dict` turns back into an equal object."""
        return {
            name: list(v) if isinstance(v := getattr(self, name), tuple) else v
            for name in _field_names()
        }

    def choices(self) -> list[SamplingParams]:
        """One params per choice (n of them, each with n = 1). Choice k of a seeded request
        samples with seed + k (wrapped into int64), so that the n choices differ reproducibly."""
        if self.n == 1:
            return [self]
        seeds = [None if self.seed is None else wrap_int64(self.seed + k) for k in range(self.n)]
        return [dataclasses.replace(self, n=1, seed=seed) for seed in seeds]

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@functools.cache
def accepted_names() -> tuple[str, ...]:
    """Every key `SamplingParams.from_dict` accepts, aliases included."""
    return tuple(sorted([f.name for f in fields(SamplingParams)] + list(_ALIASES)))


@functools.cache
def _accepted_set() -> frozenset[str]:
    return frozenset(accepted_names())


@functools.cache
def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(SamplingParams))


def wrap_int64(value: int) -> int:
    """`value` folded into the int64 range (two's complement)."""
    return (value + 2**63) % 2**64 - 2**63


def show(value: Any) -> str:
    """`repr(value)` for an error message, short even for an integer of thousands of digits
    (whose repr would raise past Python's digit limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        sign = "a negative" if value < 0 else "an"
        return f"{sign} integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _check_known_keys(d: Mapping[Any, Any]) -> None:
    accepted = _accepted_set()
    unknown = [key for key in d if key not in accepted]
    if unknown:
        raise SamplingParamsError(
            str(unknown[0]),
            f"unknown sampling parameter(s) {', '.join(map(show, unknown))}; "
            f"accepted names are: {', '.join(accepted_names())}",
        )


def _as_tuple(name: str, value: Any, scalar_type: type | None = None) -> tuple[Any, ...]:
    if scalar_type is not None and isinstance(value, scalar_type):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise SamplingParamsError(name, f"{name} must be a list, got {type(value).__name__}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _require(ok: bool, name: str, what: str, value: Any) -> None:
    if not ok:
        raise SamplingParamsError(
            name, f"{name} must be {what}, got {show(value)} ({type(value).__name__})"
        )


def _check_types(p: SamplingParams) -> None:
    for name in _INT_FIELDS:
        _require(_is_int(getattr(p, name)), name, "an int", getattr(p, name))
    for name in _FLOAT_FIELDS:
        value = getattr(p, name)
        _require(_is_finite_number(value), name, "a finite number", value)
    for name in _BOOL_FIELDS:
        _require(isinstance(getattr(p, name), bool), name, "a bool", getattr(p, name))
    _require(p.seed is None or _is_int(p.seed), "seed", "an int or None", p.seed)
    _require(isinstance(p.stop, tuple), "stop", "a tuple of str", p.stop)
    for s in p.stop:
        _require(isinstance(s, str) and s != "", "stop", "a list of non-empty str", s)
    _require(isinstance(p.stop_token_ids, tuple), "stop_token_ids", "a tuple", p.stop_token_ids)
    for t in p.stop_token_ids:
        _require(_is_int(t), "stop_token_ids", "a list of ints", t)


def _check_ranges(p: SamplingParams) -> None:
    for name, predicate, allowed in _RANGES:
        value = getattr(p, name)
        if not predicate(value):
            raise SamplingParamsError(name, f"{name} must be {allowed}, got {show(value)}")
    if not 0 <= p.min_new_tokens <= p.max_new_tokens:
        raise SamplingParamsError(
            "min_new_tokens",
            f"min_new_tokens must be in [0, max_new_tokens={p.max_new_tokens}], "
            f"got {show(p.min_new_tokens)}",
        )
    lo, hi = SEED_RANGE
    _require(p.seed is None or lo <= p.seed <= hi, "seed", f"in [{lo}, {hi}]", p.seed)
    _check_stops(p)


def _check_stops(p: SamplingParams) -> None:
    _require(
        len(p.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings", len(p.stop)
    )
    for s in p.stop:
        _require(
            len(s) <= MAX_STOP_CHARS, "stop", f"strings of at most {MAX_STOP_CHARS} characters", s
        )
    ids = p.stop_token_ids
    _require(
        len(ids) <= MAX_STOP_TOKEN_IDS,
        "stop_token_ids",
        f"at most {MAX_STOP_TOKEN_IDS} ids",
        len(ids),
    )
    for t in ids:
        _require(0 <= t <= INT32_MAX, "stop_token_ids", f"a list of ids in [0, {INT32_MAX}]", t)
