"""The HTTP front end: routes, error mapping, disconnects, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pipeserve.frontend.image_sources import ImageError
from pipeserve.server import native, openai_api
from pipeserve.server.frontend import EngineDead, Frontend, OverBound, QueueFull, ShuttingDown
from pipeserve.server.jobs import submitted
from pipeserve.server.metrics import CONTENT_TYPE
from pipeserve.server.openai_api import ModelInfo
from pipeserve.server.protocol import ApiError, parse_json
from pipeserve.server.push import PushStream, sse_event

logger = logging.getLogger("pipeserve.server")


def build_app(
    frontend: Frontend,
    model: ModelInfo,
    on_shutdown: Callable[[], Awaitable[None]],
    max_body_bytes: int = 32 << 20,
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

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        """200 while every rank lives (checked now) and the server takes requests; else 503."""
        if not frontend.is_alive():
            return JSONResponse({"status": "dead", "reason": frontend.dead}, status_code=503)
        if frontend.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": model.name,
            "object": "model",
            "created": int(frontend.metrics.started),
            "owned_by": "pipeserve",
            "max_model_len": model.context_length,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(frontend.metrics.render(), media_type=CONTENT_TYPE)

    interval = frontend.stream_interval

    def _serve(request: Request, parse: Callable, run: Callable, stream: Callable) -> Any:
        return serve_request(frontend, max_body_bytes, request, parse, run, stream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(
            request,
            lambda b: openai_api.parse_completion(b, model),
            lambda j: openai_api.complete(frontend, j, model, False),
            lambda j, states: openai_api.CompletionEvents(j, model, False, states, interval),
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _serve(
            request,
            lambda b: openai_api.parse_chat(b, model),
            lambda j: openai_api.complete(frontend, j, model, True),
            lambda j, states: openai_api.CompletionEvents(j, model, True, states, interval),
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
            lambda j, states: native.GenerateEvents(j, model, states, interval),
        )

    # the request routes, for `direct_routes`: each handles its own errors (serve_request)
    app.state.direct = {
        ("POST", "/v1/completions"): completions,
        ("POST", "/v1/chat/completions"): chat,
        ("POST", "/generate"): generate,
    }
    return app


def direct_routes(app: FastAPI) -> Callable[[Any, Any, Any], Awaitable[None]]:
    """`app`, with the requests for its generation routes (`app.state.direct`, by exact method
    and path) handed to their handler without the framework's middleware stack and dependency
    solving (a dozen coroutine layers per request: about a fifth of a 2-token request's front-end
    CPU on the 2-core box). The handlers catch their own errors (`serve_request`); everything
    else, a path with a trailing slash included, goes through `app`."""
    routes = app.state.direct

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        handler = routes.get((scope.get("method"), scope.get("path")))
        if handler is None or scope["type"] != "http":
            await app(scope, receive, send)
            return
        response = await handler(Request(scope, receive, send))
        await response(scope, receive, send)

    return asgi


INLINE_PARSE_BYTES = 4096  # bodies up to this, naming no image, are parsed on the event loop


async def serve_request(
    frontend: Frontend,
    max_body_bytes: int,
    request: Request,
    parse: Callable,
    run: Callable,
    stream: Callable,
) -> Response:
    """Parses the body (a large one off the event loop: tokenizing a long prompt must not stall the
    others), then answers as JSON or SSE; every failure becomes an OpenAI-style error. A stream's
    first event is awaited before the response starts, so that a request refused at admission
    (queue full, engine dead, shutting down) or failing before its first token gets its own
    status."""
    try:
        frontend.check_open()
        raw = await _read_body(request, max_body_bytes)
        # a short text request: a thread's hand-off would cost more than the work (an image may
        # be read, fetched or decoded in parsing: never on the loop)
        if len(raw) <= INLINE_PARSE_BYTES and b"image" not in raw:
            job = parse(parse_json(raw))
        else:
            job = await asyncio.to_thread(lambda: parse(parse_json(raw)))
        if job.stream:
            return await _unless_disconnected(request, _start_stream(frontend, job, stream))
        return JSONResponse(await _unless_disconnected(request, run(job)))
    except Exception as e:
        return _error_response(e)


async def _start_stream(frontend: Frontend, job: Any, make_events: Callable) -> PushStream:
    """Admits and submits the job, waits for its first events and hands the rest to a PushStream
    (which, from then on, owns the admission: leaving it aborts what is unfinished)."""
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(frontend.admitted(job.num_requests))
        await submitted(frontend, job, run)
        events = make_events(job, run.states)
        first: list[bytes] = []
        while not first:
            first = events.step(await run.next_changes())
        return PushStream(run, events, first, stack.pop_all().close, _error_event)


def _error_event(e: Exception) -> bytes:
    """A stream's last event when it fails after it has started."""
    return sse_event(_as_api_error(e).body())


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (before reading it, when the client declares
    its length)."""
    too_large = ApiError(
        f"the request body is larger than {limit} bytes (--max-request-body-bytes)",
        status=413,
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        logger.info("client disconnected while sending the request body")
        raise ApiError("client disconnected", status=499) from None
    return b"".join(chunks)


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


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ImageError):
        return ApiError(str(e), e.param)
    if isinstance(e, OverBound):
        return ApiError(str(e), "n")
    if isinstance(e, QueueFull):
        return ApiError(str(e), status=503, kind="server_overloaded", code="queue_full")
    if isinstance(e, ShuttingDown):
        return ApiError(str(e), status=503, kind="server_error", code="server_shutting_down")
    if isinstance(e, EngineDead):
        return ApiError(
            f"the engine has failed: {e}", status=503, kind="server_error", code="engine_dead"
        )
    logger.exception("request failed")
    return ApiError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error")


def _error_response(e: Exception) -> JSONResponse:
    error = _as_api_error(e)
    return JSONResponse(error.body(), status_code=error.status)
