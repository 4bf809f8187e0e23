"""Prompt templates: Python `str.format` syntax restricted to plain names (`{a}+{b}=`).

Attribute and index access (`{x.y}`, `{x[0]}`) and positional fields (`{}`, `{0}`) are refused,
so a template can read only the values it names and nothing reachable from them. `{{` and `}}`
write literal braces; a format spec (`{score:.2f}`) is allowed.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template that cannot be parsed or names a field in a way that is not allowed."""


def template_fields(template: str) -> tuple[str, ...]:
    """The names a template reads, in order of first use."""
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as e:
        raise TemplateError(f"cannot parse template {template!r}: {e}") from None
    names: list[str] = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier():
            raise TemplateError(
                f"template {template!r} has the field {{{name}}}: only plain names such as "
                "{a} are allowed (no positions, attributes or indexes)"
            )
        if conversion is not None or "{" in (spec or ""):
            raise TemplateError(
                f"template {template!r}: conversions (!r) and nested fields in a format spec "
                "are not allowed"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fills a template checked by `template_fields`; every field must be in `values`."""
    out: list[str] = []
    for literal, name, spec, _ in _FORMATTER.parse(template):
        out.append(literal)
        if name is not None:
            out.append(format(values[name], spec or ""))
    return "".join(out)
