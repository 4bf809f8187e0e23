"""One OpenAI-compatible endpoint: builds a column's request, sends it, retries what can pass on
a second try (429, 5xx, connection errors and timeouts) and parses the answer.

Whether a request carries `priority`, and in which direction, is the endpoint's `priority_order`
(see `config.PRIORITY_ORDERS`): the OpenAI API refuses unknown fields with a 400, pipeserve and
vLLM serve lower values first, SGLang by default higher values first.

A completions request may carry several prompts of one column (`prompt` as a list, which the
OpenAI API, vLLM, SGLang and pipeserve accept); the answer's choices come back by `index`. When
such a request is refused for good (a 4xx at once, a 5xx after its attempts), each prompt is sent
again alone, so that only the cell at fault fails. Such a request's token usage is shared out
over its prompts by length (exact for a request of one prompt).

The client tells the endpoint's `AdaptiveLimit` of every overload answer (429, 503) as it comes
and of every success, so the requests in flight shrink while the server refuses and grow back.
A caller holds a slot of that limit around `generate` (the dispatcher does); a retry after an
overload waits for a slot again under the lowered limit.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from pipeserve.pipeline.endpoint.http import ConnectError, HttpClient, HttpError, Response
from pipeserve.pipeline.endpoint.limit import AdaptiveLimit
from pipeserve.pipeline.job.config import Endpoint, LLMColumn, RetryPolicy

RETRY_STATUS = frozenset({408, 409, 429})  # and every status >= 500
OVERLOAD_STATUS = frozenset({429, 503})
# A completions prompt, or a chat request's messages.
Prompt = str | list[dict[str, str]]


class CellError(Exception):
    """A request that failed for good: not retryable, or out of attempts."""


class _Refused(CellError):
    """A 4xx that retrying will not change."""


class _ServerError(CellError):
    """A 5xx on every attempt: maybe caused by one prompt of a batch."""


class EndpointDown(CellError):
    """The last attempt could not connect: the endpoint is taken to be down for the run."""


@dataclass(frozen=True)
class Probe:
    """What `GET {base_url}/models` showed: whether any HTTP answer came, and who serves."""

    reachable: bool
    problem: str = ""
    owned_by: str | None = None


@dataclass(frozen=True)
class Generation:
    """One prompt's answer and its share of the request's token usage."""

    text: str
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Answer:
    """The outcome of one request: a `Generation` or a `CellError` per prompt, in prompt order."""

    results: list[Generation | CellError]

    @property
    def prompt_tokens(self) -> int:
        return sum(g.prompt_tokens for g in self.results if isinstance(g, Generation))

    @property
    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.results if isinstance(g, Generation))


class EndpointClient:
    def __init__(
        self,
        endpoint: Endpoint,
        retry: RetryPolicy,
        priority_order: str = "off",
        limit: AdaptiveLimit | None = None,
    ) -> None:
        assert priority_order in ("off", "lower-first", "higher-first"), "resolve 'auto' first"
        self.endpoint = endpoint
        self.priority_order = priority_order
        self.limit = limit or AdaptiveLimit(endpoint.max_concurrency, endpoint.adaptive)
        self._retry = retry
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self._http = HttpClient(
            endpoint.base_url, headers, endpoint.timeout_s, endpoint.max_concurrency
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def body(self, column: LLMColumn, prompts: list[Prompt], priority: int) -> dict[str, Any]:
        body: dict[str, Any] = dict(column.params)
        if self.endpoint.model is not None:
            body["model"] = self.endpoint.model
        if column.api == "chat":
            assert len(prompts) == 1, "a chat request carries one conversation"
            body["messages"] = prompts[0]
        else:
            body["prompt"] = prompts[0] if len(prompts) == 1 else prompts
        if column.output_schema is not None and self.endpoint.response_format:
            schema = {"name": column.name, "schema": dict(column.output_schema)}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        if self.priority_order != "off":
            body["priority"] = priority if self.priority_order == "lower-first" else -priority
        return body

    async def generate(self, column: LLMColumn, prompts: list[Prompt], priority: int) -> Answer:
        """Sends the prompts of one column in one request; never raises `CellError`: a prompt that
        failed for good has its error in place of its text."""
        try:
            return await self._post(column, prompts, priority)
        except (_Refused, _ServerError) as e:
            if len(prompts) == 1:
                return Answer([e])
        except CellError as e:
            return Answer([e] * len(prompts))
        alone = await asyncio.gather(*(self.generate(column, [p], priority) for p in prompts))
        return Answer([a.results[0] for a in alone])

    async def _post(self, column: LLMColumn, prompts: list[Prompt], priority: int) -> Answer:
        path = "/chat/completions" if column.api == "chat" else "/completions"
        body = json.dumps(self.body(column, prompts, priority)).encode()
        for attempt in range(1, self._retry.max_attempts + 1):
            sent_at = time.monotonic()
            try:
                response = await self._http.post(path, body)
            except HttpError as e:
                problem, wait = _transport_problem(e), None
                error = EndpointDown if isinstance(e, ConnectError) else CellError
            else:
                if response.status_code == 200:
                    self.limit.succeeded()
                    return _parse(response, column.api, prompts)
                problem = f"HTTP {response.status_code}: {_error_text(response)}"
                if not _retryable(response.status_code):
                    raise _Refused(problem)
                wait = _retry_after(response)
                if response.status_code in OVERLOAD_STATUS:
                    self.limit.overloaded(wait, sent_at)
                    if attempt < self._retry.max_attempts:
                        await self.limit.rejoin()
                broken = response.status_code >= 500 and response.status_code not in OVERLOAD_STATUS
                error = _ServerError if broken else CellError
            if attempt < self._retry.max_attempts:
                delay = self._retry.delay_s(attempt)
                await asyncio.sleep(delay if wait is None else min(wait, self._retry.max_backoff_s))
        raise error(f"{problem} (after {self._retry.max_attempts} attempts)")


def _transport_problem(e: HttpError) -> str:
    return f"{type(e).__name__}: {e}".rstrip(": ")


async def probe(endpoint: Endpoint) -> Probe:
    """Any HTTP answer to `GET {base_url}/models` shows the endpoint is up (before a run)."""
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    timeout = min(10.0, endpoint.timeout_s)
    http = HttpClient(endpoint.base_url, headers, timeout, 1)
    try:
        response = await http.get("/models")
    except HttpError as e:
        return Probe(False, _transport_problem(e))
    finally:
        await http.aclose()
    try:
        return Probe(True, owned_by=str(response.json()["data"][0]["owned_by"]))
    except (ValueError, KeyError, IndexError, TypeError):
        return Probe(True)


def priority_order(endpoint: Endpoint, found: Probe) -> str:
    """The endpoint's `priority` setting with "auto" resolved by what the probe found."""
    if endpoint.priority != "auto":
        return endpoint.priority
    return "lower-first" if found.owned_by == "pipeserve" else "off"


def _retryable(status: int) -> bool:
    return status >= 500 or status in RETRY_STATUS


def _retry_after(response: Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _error_text(response: Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _parse(response: Response, api: str, prompts: list[Prompt]) -> Answer:
    try:
        data = response.json()
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise ValueError(f"{len(choices)} choices for {len(prompts)} prompts")
        texts = [c["message"]["content"] if api == "chat" else c["text"] for c in choices]
        texts = [t if t is not None else "" for t in texts]
        usage = data.get("usage") or {}
        prompt_share = _shares(int(usage.get("prompt_tokens") or 0), [str(p) for p in prompts])
        text_share = _shares(int(usage.get("completion_tokens") or 0), texts)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        error = CellError(f"malformed response ({type(e).__name__}: {e}): {response.text[:300]}")
        return Answer([error] * len(prompts))
    return Answer(
        [
            Generation(t, c.get("finish_reason"), p, n)
            for t, c, p, n in zip(texts, choices, prompt_share, text_share, strict=True)
        ]
    )


def _shares(total: int, texts: list[str]) -> list[int]:
    """`total` tokens shared out over `texts` in proportion to their length; sums to `total`."""
    weights = [max(1, len(t)) for t in texts]
    cuts = [total * sum(weights[: i + 1]) // sum(weights) for i in range(len(weights))]
    return [b - a for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
