"""The ASGI app: POST /v1/predict, GET /v1/library, /healthz, /readyz, /metrics, OpenAPI docs at /docs.

Every client error is a 4xx JSON body {error, detail}; the server keeps serving after it. The app reads
the body itself (size limit, content type, strict UTF-8, depth-limited JSON) so that no malformed request
reaches FastAPI's own parsing, and the same rules are documented as the request schema in /docs."""

from __future__ import annotations

import logging
import time
from typing import Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mergetool.core.version import __version__
from mergetool.serve.limits import ServeLimits
from mergetool.serve.metrics import ServeMetrics
from mergetool.serve.wire import BadRequest, ErrorBody, PredictRequest, PredictResponse, parse_predict

log = logging.getLogger("mergetool.serve")
ERRORS = {s: {"model": ErrorBody} for s in (400, 413, 415, 422, 429, 503, 504)}
KNOWN = {"/v1/predict", "/v1/library", "/healthz", "/readyz", "/metrics"}  # metric labels; anything else is "other"


class Predictor(Protocol):
    """What the app needs from the model side: the embedded batcher, or a Ray Serve deployment's."""
    tasks: list[str]

    async def predict(self, items: list[tuple], task: Optional[str], return_logits: bool) -> list[dict]: ...

    def describe(self) -> dict: ...


def inline_schema(model) -> dict:
    """The model's JSON schema with its $defs put in place (an OpenAPI document has no root $defs)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def error_response(exc: BadRequest) -> JSONResponse:
    return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it (or its declared length) passes the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise BadRequest(400, "invalid_request", "the Content-Length header is not a number")
    if declared is not None and int(declared) > limit:
        raise BadRequest(413, "body_too_large", f"the body is over {limit} bytes; send fewer inputs per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, "body_too_large", f"the body is over {limit} bytes; send fewer inputs per "
                             "request")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(predictor: Predictor, limits: ServeLimits, metrics: Optional[ServeMetrics] = None, *,
               lifespan=None, on_metrics=None) -> FastAPI:
    """The app over a predictor. `lifespan` starts and stops the predictor (the embedded server's
    batcher); `on_metrics` refreshes gauges before /metrics renders."""
    metrics = metrics or ServeMetrics()
    app = FastAPI(title="mergetool", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  description="Route inputs to expert chains of a MERGE library and predict in batches.")
    app.state.ready, app.state.draining = False, False

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        name = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": name, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": "invalid_request", "detail": f"{where}: {first.get('msg', 'invalid')}"},
                            status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error")
        return JSONResponse({"error": "internal", "detail": type(exc).__name__}, status_code=500)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path if request.url.path in KNOWN else "other",
                                str(response.status_code)).inc()
        return response

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": inline_schema(PredictRequest)}}}})
    async def predict(request: Request):
        """Route each input (or use `task`), run it through its chain in a batch with other requests' inputs,
        and answer in input order."""
        t0 = time.perf_counter()
        if app.state.draining:
            raise BadRequest(503, "draining", "the server is shutting down; retry on another replica")
        body = await read_body(request, limits.max_body_bytes)
        req = parse_predict(body, request.headers.get("content-type"), predictor.tasks, limits.max_inputs)
        outputs = await predictor.predict(req.items, req.task, req.return_logits)
        metrics.latency.observe(time.perf_counter() - t0)
        return JSONResponse({"outputs": outputs})

    @app.get("/v1/library")
    async def library():
        """Tasks, chains, storage cost C, routing accuracy and the model card's metadata."""
        return predictor.describe()

    @app.get("/healthz")
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz():
        """Readiness: the library is loaded, verified and warm, and the server is not draining."""
        if app.state.draining:
            return JSONResponse({"error": "draining", "detail": "shutting down"}, status_code=503)
        if not app.state.ready:
            return JSONResponse({"error": "not_ready", "detail": "loading the library"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus():
        """Prometheus text: requests, latency, batch sizes, queue depth, inputs per chain, resident chains."""
        if on_metrics is not None:
            on_metrics()
        return Response(metrics.render(), media_type=metrics.content_type)

    app.state.metrics = metrics
    return app
