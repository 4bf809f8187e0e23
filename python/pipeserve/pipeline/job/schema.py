"""Structured cells: a model's text parsed as JSON and checked against a column's JSON schema.

The runner checks a subset of JSON Schema, enough for the objects a data-generation job asks a
model for; a schema using any other keyword is refused when the job is built, so no constraint is
ever silently ignored:

    type (a name or a list), enum, const, properties, required, additionalProperties (a boolean
    or a schema), items, minItems, maxItems, minLength, maxLength, pattern, minimum, maximum,
    exclusiveMinimum, exclusiveMaximum, and the annotations title, description, default,
    examples, $schema.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

CHECKS = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "items",
    "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum",
}  # fmt: skip
ANNOTATIONS = {"title", "description", "default", "examples", "$schema"}
TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


class SchemaError(ValueError):
    """A schema outside the supported subset."""


def check_schema(schema: Any, where: str = "schema") -> None:
    """Raises `SchemaError` naming the first keyword or value the runner cannot check."""
    if not isinstance(schema, Mapping):
        raise SchemaError(f"{where}: expected a mapping, got {type(schema).__name__}")
    unknown = sorted(set(schema) - CHECKS - ANNOTATIONS)
    if unknown:
        raise SchemaError(f"{where}: keyword {unknown[0]!r} is not supported (see schema.py)")
    types = schema.get("type", [])
    for t in [types] if isinstance(types, str) else types:
        if t not in TYPES:
            raise SchemaError(f"{where}.type: unknown type {t!r}")
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{where}.properties.{name}")
    if isinstance(schema.get("additionalProperties"), Mapping):
        check_schema(schema["additionalProperties"], f"{where}.additionalProperties")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")


def parse_json(text: str) -> Any:
    """The JSON value in a model's answer: the whole text, a ```json fenced block, or the span
    from the first `{` (or `[`) to the last `}` (or `]`). Raises `ValueError`."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    for open_, close in ("{}", "[]"):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate, parse_constant=_no_constant)
        except ValueError:
            continue
    raise ValueError(f"no JSON value in the answer: {text[:200]!r}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def problems(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """What in `value` breaks `schema` (a schema `check_schema` accepted); empty when valid."""
    if "type" in schema and not _is_type(value, schema["type"]):
        return [f"{path}: expected {schema['type']}, got {_type_name(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    if "const" in schema and value != schema["const"]:
        return [f"{path}: expected {schema['const']!r}"]
    if isinstance(value, dict):
        return _object_problems(value, schema, path)
    if isinstance(value, list):
        return _array_problems(value, schema, path)
    if isinstance(value, str):
        return _string_problems(value, schema, path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number_problems(value, schema, path)
    return []


def _object_problems(value: dict, schema: Mapping[str, Any], path: str) -> list[str]:
    found = [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            found += problems(item, properties[key], f"{path}.{key}")
        elif extra is False:
            found.append(f"{path}: unexpected key {key!r}")
        elif isinstance(extra, Mapping):
            found += problems(item, extra, f"{path}.{key}")
    return found


def _array_problems(value: list, schema: Mapping[str, Any], path: str) -> list[str]:
    found = _bounds(len(value), schema, "minItems", "maxItems", path, "items")
    if "items" in schema:
        for i, item in enumerate(value):
            found += problems(item, schema["items"], f"{path}[{i}]")
    return found


def _string_problems(value: str, schema: Mapping[str, Any], path: str) -> list[str]:
    found = _bounds(len(value), schema, "minLength", "maxLength", path, "characters")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        found.append(f"{path}: does not match {schema['pattern']!r}")
    return found


def _number_problems(value: float, schema: Mapping[str, Any], path: str) -> list[str]:
    if math.isnan(value) or math.isinf(value):
        return [f"{path}: {value} is not a JSON number"]
    found = _bounds(value, schema, "minimum", "maximum", path, "")
    if "exclusiveMinimum" in schema and not value > schema["exclusiveMinimum"]:
        found.append(f"{path}: must be > {schema['exclusiveMinimum']}")
    if "exclusiveMaximum" in schema and not value < schema["exclusiveMaximum"]:
        found.append(f"{path}: must be < {schema['exclusiveMaximum']}")
    return found


def _bounds(
    n: float, schema: Mapping[str, Any], low: str, high: str, path: str, unit: str
) -> list[str]:
    found = []
    if low in schema and n < schema[low]:
        found.append(f"{path}: {n} {unit} is below {low} {schema[low]}".replace("  ", " "))
    if high in schema and n > schema[high]:
        found.append(f"{path}: {n} {unit} is above {high} {schema[high]}".replace("  ", " "))
    return found


def _is_type(value: Any, wanted: str | list[str]) -> bool:
    names = [wanted] if isinstance(wanted, str) else wanted
    for name in names:
        if isinstance(value, bool) and name not in ("boolean",):
            continue
        if name == "integer" and isinstance(value, float) and value.is_integer():
            return True
        if isinstance(value, TYPES[name]):
            return True
    return False


def _type_name(value: Any) -> str:
    return next((n for n, t in TYPES.items() if _is_type(value, n) and n != "number"), "number")
