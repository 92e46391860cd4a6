"""The embedded server: one process, the batcher in it, uvicorn in front; graceful drain on SIGTERM.

On SIGTERM (or Ctrl+C) the server stops accepting connections, answers /readyz 503, finishes the requests
in flight and the queued inputs, and exits 0."""

from __future__ import annotations

import signal
from contextlib import asynccontextmanager
from typing import Optional

from mergetool.serve.app import create_app
from mergetool.serve.batcher import Batcher
from mergetool.serve.engine import LibraryEngine
from mergetool.serve.limits import ServeLimits
from mergetool.serve.metrics import ServeMetrics


class BatchedPredictor:
    """The embedded predictor: requests go through the in-process batcher to the library."""

    def __init__(self, engine: LibraryEngine, limits: ServeLimits, metrics: ServeMetrics):
        self.engine, self.metrics, self.tasks = engine, metrics, engine.tasks
        self.batcher = Batcher(engine.run, limits, metrics,
                               on_batch=lambda outputs, requests: metrics.record_run(outputs, requests,
                                                                                     engine.chain_names))

    async def predict(self, items: list[tuple], task: Optional[str], return_logits: bool) -> list[dict]:
        return await self.batcher.submit(items, task, return_logits)

    def describe(self) -> dict:
        return self.engine.describe()

    def refresh(self) -> None:
        self.metrics.record_resident(*self.engine.resident())


def build_app(engine: LibraryEngine, limits: ServeLimits):
    """The app over an engine, with the batcher started and drained by the app's lifespan."""
    metrics = ServeMetrics()
    predictor = BatchedPredictor(engine, limits, metrics)

    @asynccontextmanager
    async def lifespan(app):
        await predictor.batcher.start()
        app.state.ready = True
        yield
        app.state.draining = True
        await predictor.batcher.close(drain_s=limits.timeout_s)

    app = create_app(predictor, limits, metrics, lifespan=lifespan, on_metrics=predictor.refresh)
    app.state.predictor = predictor
    app.state.on_drain = predictor.batcher.begin_drain
    return app


def run_server(app, sock, limits: ServeLimits, log_level: str = "info") -> None:
    """Serve on a bound socket until SIGTERM/SIGINT, then drain and return (the command exits 0)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.draining = True
            drain = getattr(app.state, "on_drain", None)
            if drain is not None:
                drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(limits.timeout_s) + 5, lifespan="on")
    # uvicorn re-raises the captured signal once it has shut down; with these handlers that ends in a
    # normal return (exit 0) instead of the default SIGTERM death.
    previous = {s: signal.signal(s, _ignore) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        DrainingServer(config).run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _ignore(sig, frame) -> None:
    return None
