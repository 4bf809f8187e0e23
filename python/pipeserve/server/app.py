"""The HTTP front end: routes, error mapping, disconnects, health and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeserve.server import native, openai_api
from pipeserve.server.frontend import EngineDead, Frontend, OverBound, QueueFull
from pipeserve.server.metrics import render_metrics
from pipeserve.server.openai_api import ModelInfo
from pipeserve.server.protocol import ApiError

logger = logging.getLogger("pipeserve.server")


def build_app(
    frontend: Frontend, model: ModelInfo, on_shutdown: Callable[[], Awaitable[None]]
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        frontend.start()
        yield
        await on_shutdown()

    app = FastAPI(title="pipeserve", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(
            str(exc.detail),
            status=exc.status_code,
            code="not_found" if exc.status_code == 404 else None,
        )
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> Response:
        if frontend.dead is not None:
            return JSONResponse({"status": "dead", "reason": frontend.dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": model.name,
            "object": "model",
            "created": int(frontend.counters.started),
            "owned_by": "pipeserve",
            "max_model_len": model.context_length,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(render_metrics(frontend), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(
            request,
            lambda b: openai_api.parse_completion(b, model),
            lambda j: openai_api.complete(frontend, j, model, False),
            lambda j: openai_api.stream(frontend, j, model, False),
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _serve(
            request,
            lambda b: openai_api.parse_chat(b, model),
            lambda j: openai_api.complete(frontend, j, model, True),
            lambda j: openai_api.stream(frontend, j, model, True),
        )

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        parsed: dict[str, bool] = {}

        def parse(body: dict) -> Any:
            job, parsed["batch"] = native.parse_generate(body, model)
            return job

        return await _serve(
            request,
            parse,
            lambda j: native.generate(frontend, j, model, parsed["batch"]),
            lambda j: native.generate_stream(frontend, j, model),
        )

    return app


async def _serve(request: Request, parse: Callable, run: Callable, stream: Callable) -> Response:
    """Parses the body, then answers as JSON or SSE; every failure becomes an OpenAI-style error.
    A stream's first event is awaited before the response starts, so that a request refused at
    admission (queue full, engine dead) or failing before its first token gets its own status."""
    try:
        job = parse(await _json_body(request))
        if job.stream:
            events = stream(job)
            first = await _unless_disconnected(request, anext(events))
            return StreamingResponse(_guard_stream(first, events), media_type="text/event-stream")
        return JSONResponse(await _unless_disconnected(request, run(job)))
    except Exception as e:
        return _error_response(e)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Runs `work`; if the client goes away first, cancels it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError("client disconnected", status=499)
    finally:
        task.cancel()


async def _guard_stream(first: str, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Errors after the stream has started travel as a final error event."""
    try:
        yield first
        async for event in events:
            yield event
    except Exception as e:
        error = _as_api_error(e)
        yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, OverBound):
        return ApiError(str(e), "n")
    if isinstance(e, QueueFull):
        return ApiError(str(e), status=503, kind="server_overloaded", code="queue_full")
    if isinstance(e, EngineDead):
        return ApiError(
            f"the engine has failed: {e}", status=503, kind="server_error", code="engine_dead"
        )
    logger.exception("request failed")
    return ApiError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error")


def _error_response(e: Exception) -> JSONResponse:
    error = _as_api_error(e)
    return JSONResponse(error.body(), status_code=error.status)
