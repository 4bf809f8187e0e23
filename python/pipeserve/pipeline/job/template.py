"""Prompt templates in two syntaxes, both reading only the values they name.

- "format": Python `str.format` syntax restricted to names and key paths (`{a}+{b}=`,
  `{review.score}` for a field of a structured column's object). Positional fields (`{}`,
  `{0}`), indexes (`{x[0]}`), conversions (`{a!r}`) and names starting with `_` are refused.
  `{{` and `}}` write literal braces; a format spec (`{score:.2f}`) is allowed.
- "jinja": a sandboxed Jinja2 template (`{{ review.score }}`, `{% for %}`, filters); a name it
  reads that the row lacks is an error, never an empty string.

In both, a dict or list value is written as JSON, never as Python's repr.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox

SYNTAXES = ("format", "jinja")
_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template that cannot be parsed or names a field in a way that is not allowed."""


def _finalize(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


_JINJA = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, finalize=_finalize, keep_trailing_newline=True
)


def template_fields(template: str, syntax: str = "format") -> tuple[str, ...]:
    """The top-level names a template reads (in order of first use for "format")."""
    if syntax == "jinja":
        try:
            return tuple(sorted(jinja2.meta.find_undeclared_variables(_JINJA.parse(template))))
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"cannot parse template {template!r}: {e}") from None
    names: list[str] = []
    for path in _format_paths(template):
        if path[0] not in names:
            names.append(path[0])
    return tuple(names)


def _format_paths(template: str) -> list[tuple[str, ...]]:
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as e:
        raise TemplateError(f"cannot parse template {template!r}: {e}") from None
    paths = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        path = tuple(name.split("."))
        if not all(p.isidentifier() and not p.startswith("_") for p in path):
            raise TemplateError(
                f"template {template!r} has the field {{{name}}}: only names and key paths such "
                "as {a} or {a.b} are allowed (no positions, indexes or names starting with _)"
            )
        if conversion is not None or "{" in (spec or ""):
            raise TemplateError(
                f"template {template!r}: conversions (!r) and nested fields in a format spec "
                "are not allowed"
            )
        paths.append(path)
    return paths


def render(template: str, values: Mapping[str, Any], syntax: str = "format") -> str:
    """Fills a template checked by `template_fields`. Raises `ValueError` (or `TypeError`) when
    a value does not fit: a missing key, a format spec for another type."""
    if syntax == "jinja":
        try:
            return _compiled(template).render(values)
        except jinja2.TemplateError as e:
            raise ValueError(f"{type(e).__name__}: {e}") from None
    out: list[str] = []
    for literal, name, spec, _ in _FORMATTER.parse(template):
        out.append(literal)
        if name is not None:
            out.append(format(_finalize(_lookup(values, name)), spec or ""))
    return "".join(out)


@lru_cache(maxsize=256)
def _compiled(template: str) -> jinja2.Template:
    return _JINJA.from_string(template)


def _lookup(values: Mapping[str, Any], name: str) -> Any:
    head, *keys = name.split(".")
    value = values[head]
    for i, key in enumerate(keys):
        if not isinstance(value, Mapping) or key not in value:
            raise ValueError(f"{'.'.join([head, *keys[:i]])} has no key {key!r}")
        value = value[key]
    return value
