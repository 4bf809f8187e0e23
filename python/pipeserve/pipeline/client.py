"""One OpenAI-compatible endpoint: builds a column's request, sends it, retries what can pass on
a second try (429, 5xx, connection errors and timeouts) and parses the answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from pipeserve.pipeline.config import Endpoint, LLMColumn, RetryPolicy

RETRY_STATUS = frozenset({408, 409, 429})  # and every status >= 500


class CellError(Exception):
    """A request that failed for good: not retryable, or out of attempts."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int


class EndpointClient:
    def __init__(self, endpoint: Endpoint, retry: RetryPolicy) -> None:
        self.endpoint = endpoint
        self._retry = retry
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=endpoint.base_url.rstrip("/"),
            headers=headers,
            timeout=endpoint.timeout_s,
            limits=httpx.Limits(
                max_connections=endpoint.max_concurrency,
                max_keepalive_connections=endpoint.max_concurrency,
            ),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def body(self, column: LLMColumn, prompt: str, priority: int) -> dict[str, Any]:
        body: dict[str, Any] = dict(column.params)
        if self.endpoint.model is not None:
            body["model"] = self.endpoint.model
        if column.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        body["priority"] = priority
        return body

    async def generate(self, column: LLMColumn, prompt: str, priority: int) -> Completion:
        """Sends one cell's request; raises `CellError` once it has failed for good."""
        path = "/chat/completions" if column.api == "chat" else "/completions"
        body = self.body(column, prompt, priority)
        for attempt in range(1, self._retry.max_attempts + 1):
            try:
                response = await self._http.post(path, json=body)
            except httpx.TransportError as e:
                problem, wait = f"{type(e).__name__}: {e}".rstrip(": "), None
            else:
                if response.status_code == 200:
                    return _parse(response, column.api, attempt)
                problem = f"HTTP {response.status_code}: {_error_text(response)}"
                if not _retryable(response.status_code):
                    raise CellError(problem)
                wait = _retry_after(response)
            if attempt == self._retry.max_attempts:
                break
            delay = self._retry.delay_s(attempt)
            await asyncio.sleep(delay if wait is None else min(wait, self._retry.max_backoff_s))
        raise CellError(f"{problem} (after {self._retry.max_attempts} attempts)")


def _retryable(status: int) -> bool:
    return status >= 500 or status in RETRY_STATUS


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _parse(response: httpx.Response, api: str, attempts: int) -> Completion:
    try:
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if api == "chat" else choice["text"]
        usage = data.get("usage") or {}
        return Completion(
            text if text is not None else "",
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            attempts,
        )
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise CellError(
            f"malformed response ({type(e).__name__}: {e}): {response.text[:300]}"
        ) from None
