"""What one cell sends and what its answer means: the rendered prompt, the outcome of a
generation (a value, an error, or "generate again"), a Python cell's value and a validator's
verdict. No scheduling here: dispatch.py decides when cells run."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any

from pipeserve.pipeline.endpoint.client import CellError, Generation, Prompt
from pipeserve.pipeline.job.config import LLMColumn, PythonColumn
from pipeserve.pipeline.job.schema import parse_json, problems
from pipeserve.pipeline.job.template import render

RENDER_ERRORS = (ValueError, TypeError, KeyError)


@dataclass(frozen=True)
class Outcome:
    """A generation's meaning for its cell. `again`: the answer was unusable (it did not parse
    or fit the schema) and may be generated again; `error` then says why."""

    value: Any = None
    error: str | None = None
    again: bool = False
    usage: dict[str, Any] | None = None


def prompt(column: LLMColumn, row: dict[str, Any]) -> Prompt:
    """The completions prompt, or the chat messages, for one cell. Raises `RENDER_ERRORS`."""
    text = render(column.prompt, row, column.syntax)
    if column.api == "completions":
        return text
    messages = [{"role": "user", "content": text}]
    if column.system is not None:
        messages.insert(0, {"role": "system", "content": render(column.system, row, column.syntax)})
    return messages


def llm_outcome(column: LLMColumn, result: Generation | CellError, generation: int) -> Outcome:
    if isinstance(result, CellError):
        return Outcome(error=str(result))
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "generations": generation,
    }
    if result.finish_reason == "length" and not column.allow_truncated:
        why = "truncated: the answer reached max_tokens (finish_reason 'length')"
        return Outcome(error=f"{why}; raise max_tokens or set allow_truncated", usage=usage)
    if column.output_schema is None:
        return Outcome(result.text, usage=usage)
    try:
        value = parse_json(result.text)
    except ValueError as e:
        return Outcome(error=f"the answer is not JSON: {e}", again=True, usage=usage)
    found = problems(value, column.output_schema)
    if found:
        why = f"the answer does not fit output_schema: {'; '.join(found[:3])}"
        return Outcome(error=why, again=True, usage=usage)
    return Outcome(value, usage=usage)


def python_value(column: PythonColumn, row: dict[str, Any]) -> tuple[Any, str | None]:
    """(value, error) of a Python cell; the function's exception is the cell's error."""
    try:
        value = column.function(row)
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: close it so that it does not warn
            raise TypeError("a Python column's function must return a value, not an awaitable")
        json.dumps(value)
    except Exception as e:  # the user's function: its failure is this cell's error
        return None, f"{type(e).__name__}: {e}"
    return value, None


def rejection(verdict: Any) -> str | None:
    """None when a validator's verdict accepts; else the reason it gives."""
    if verdict is True:
        return None
    if isinstance(verdict, str) and verdict:
        return verdict
    return f"the validator returned {verdict!r}"
