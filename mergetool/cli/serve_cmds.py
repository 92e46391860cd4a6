"""`serve`: an HTTP server for an expert library (embedded uvicorn + batcher, or Ray Serve replicas)."""

from __future__ import annotations

import signal
import socket
from enum import Enum
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from mergetool.cli._errors import handles_errors
from mergetool.core.errors import MergetoolError
from mergetool.serve.limits import ServeLimits
from mergetool.serve.listen import bind_socket

D = ServeLimits()


class LogLevel(str, Enum):
    """uvicorn's log levels."""
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


@handles_errors
def serve(
    lib: Annotated[str, typer.Argument(help="Expert library folder, or hub:REPO@REV (verified as for pull).",
                                       show_default=False)],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port, printed).", min=0, max=65535)] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Inputs per model run.", min=1, max=4096)] = D.max_batch,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="How long a queued input waits for others.",
                                               min=0, max=60_000)] = D.max_wait_ms,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Queued inputs before 429 + Retry-After.",
                                           min=1)] = D.max_queue,
    max_inputs: Annotated[int, typer.Option("--max-inputs", help="Inputs per request (more: 422).", min=1)]
    = D.max_inputs,
    max_body: Annotated[int, typer.Option("--max-body", help="Request body bytes (more: 413).", min=1024)]
    = D.max_body_bytes,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request, queueing included (then 504).",
                                           min=0.001)] = D.timeout_s,
    max_resident: Annotated[int, typer.Option("--max-resident", help="Assembled chains kept in memory.", min=1)] = 4,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve instead (replicas, serve.batch).")] = False,
    replicas: Annotated[int, typer.Option("--replicas", help="Ray Serve replicas (with --ray).", min=1)] = 1,
    address: Annotated[Optional[str], typer.Option("--address", help="Join this Ray cluster (with --ray).",
                                                   show_default=False)] = None,
    log_level: Annotated[LogLevel, typer.Option("--log-level", help="uvicorn log level.")] = LogLevel.info,
) -> None:
    """Serve a library over HTTP: POST /v1/predict (dynamic batching by chain), GET /v1/library, /healthz,
    /readyz, /metrics, /docs. SIGTERM drains the requests in flight, then exits 0."""
    limits = limits_from_options(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                 max_inputs=max_inputs, max_body_bytes=max_body, timeout_s=timeout)
    if not ray and (replicas != 1 or address):
        raise MergetoolError("--replicas and --address need --ray", key="--ray", fix="add --ray or drop them")
    if ray:
        from mergetool.serve.ray_deploy import run_on_ray

        run_on_ray(lib, limits, host=host, port=port, replicas=replicas, address=address, device=device,
                   max_resident=max_resident)
        return
    signal.signal(signal.SIGTERM, _stop_while_loading)  # until the server takes over: exit 0, not 143
    sock = listen(host, port)  # before loading: a taken port is one line, not minutes later
    from mergetool.inference.runtime import ExpertLibrary  # lazy: loads torch
    from mergetool.serve.engine import LibraryEngine
    from mergetool.serve.server import build_app, run_server

    library = ExpertLibrary.load(lib, device=device, max_resident_models=max_resident)  # verified, or exit 2
    engine = LibraryEngine(library, batch_size=limits.max_batch)
    engine.warm_up()
    bound = sock.getsockname()
    typer.echo(f"serving {lib} ({len(engine.tasks)} tasks) on http://{bound[0]}:{bound[1]}", err=True)
    run_server(build_app(engine, limits), sock, limits, log_level=log_level.value)


OPTIONS = {"max_batch": "--max-batch", "max_wait_ms": "--max-wait-ms", "max_queue": "--max-queue",
           "max_inputs": "--max-inputs", "max_body_bytes": "--max-body", "timeout_s": "--timeout"}


def limits_from_options(**values) -> ServeLimits:
    """ServeLimits (where its rules live), a broken one reported as one line naming the option."""
    try:
        return ServeLimits(**values)
    except ValidationError as exc:
        e = exc.errors(include_url=False, include_input=False)[0]
        option = OPTIONS.get(e["loc"][0], "--" + str(e["loc"][0])) if e["loc"] else "--max-inputs"  # () : the queue rule
        raise MergetoolError(e["msg"].removeprefix("Value error, "), key=option,
                             fix="see mergetool serve --help for each option's range") from None


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket the server inherits, or one line naming --host/--port."""
    sock = bind_socket(host, port)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _stop_while_loading(sig, frame) -> None:
    raise SystemExit(0)


def register(app: typer.Typer) -> None:
    app.command()(serve)
