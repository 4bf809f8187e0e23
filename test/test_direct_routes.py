"""server.app.direct_routes: the generation routes are called without the framework's stack, by
exact method and path; every other request, and the lifespan, still goes through the app."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.testclient import TestClient

from pipeserve.server.app import direct_routes


def make_app() -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    through_app: list[str] = []

    @app.middleware("http")
    async def record(request: Request, call_next):  # what goes through the framework's stack
        through_app.append(f"{request.method} {request.url.path}")
        return await call_next(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        return JSONResponse({"got": (await request.json())["x"]})

    app.state.direct = {("POST", "/v1/completions"): completions}
    return app, through_app


def test_the_direct_route_skips_the_stack_and_answers_the_same():
    app, through_app = make_app()
    for asgi in (direct_routes(app), app):
        with TestClient(asgi) as client:
            r = client.post("/v1/completions", json={"x": 7})
            assert (r.status_code, r.json()) == (200, {"got": 7})
    assert through_app == ["POST /v1/completions"]  # the framework's request only


def test_other_methods_and_paths_go_through_the_app():
    app, through_app = make_app()
    with TestClient(direct_routes(app)) as client:
        assert client.get("/v1/completions").status_code == 405
        r = client.post("/v1/completions/", json={"x": 1}, follow_redirects=False)
        assert r.status_code in (307, 404)
        assert client.get("/nowhere").status_code == 404
    assert through_app == ["GET /v1/completions", "POST /v1/completions/", "GET /nowhere"]
