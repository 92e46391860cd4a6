"""`mergetool serve LIB --ray`: the same HTTP app, scaled out as Ray Serve replicas.

Each replica is one Ray actor (one process) that loads and verifies the library, warms it up and serves
the app of `create_app` through `@serve.ingress`. Inputs are batched by `@serve.batch`: a request submits
each of its inputs on its own, so one model run takes inputs of several requests, and every request gets
its outputs back in input order. Backpressure is Ray's: past `max_queued_requests` (requests waiting in a
proxy for a replica, not inputs) it answers 429 + Retry-After (503 on a Ray without `backpressure_config`).
Metrics are per replica: GET /metrics answers from whichever replica the proxy picks.

Ray is imported inside the functions: `import mergetool.serve.ray_deploy` stays cheap."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import signal
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergetool.core.errors import MergetoolError
from mergetool.serve.limits import ServeLimits
from mergetool.serve.listen import bind_socket
from mergetool.serve.wire import BadRequest, output_for

APP_NAME = "mergetool"
QUIET = {"log_level": "WARNING"}
# Ray Serve's own health checks of its HTTP proxy (documented environment settings, read when Serve starts): its
# 5 s readiness default marks the proxy unhealthy and kills it on a loaded small machine. A user's value wins.
PATIENT_PROXY = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def patient_proxy() -> None:
    """Set PATIENT_PROXY in this process's environment (before ray.init: local workers inherit it)."""
    for name, value in PATIENT_PROXY.items():
        os.environ.setdefault(name, value)


@dataclass
class Single:
    """One input on its way through `serve.batch` (the unit Ray batches)."""
    text: str
    pair: Optional[str]
    task: Optional[str]
    return_logits: bool
    request: int  # which request it came from, to count requests per model run
    started: bool = False  # taken into a model run (so it no longer counts as queued)


class ReplicaPredictor:
    """The predictor of one replica: the engine, this replica's metrics, and the app over them.

    `submit` is the deployment's `serve.batch` method (one Single in, one output out); it calls
    `run_batch` with the inputs Ray grouped."""

    def __init__(self, engine, limits: ServeLimits, submit):
        from mergetool.serve.app import create_app  # lazy: fastapi
        from mergetool.serve.metrics import ServeMetrics

        self.engine, self.limits, self.submit, self.tasks = engine, limits, submit, engine.tasks
        self.metrics = ServeMetrics()
        self.queued = 0
        self._ids = itertools.count()

        @asynccontextmanager
        async def lifespan(app):
            yield
            app.state.draining = True  # Ray stops routing here first; this covers the last requests

        self.app = create_app(self, limits, self.metrics, lifespan=lifespan, on_metrics=self.refresh)
        self.app.state.predictor = self
        self.app.state.ready = True  # loaded, verified and warm before the app exists

    async def predict(self, items: list[tuple], task: Optional[str], return_logits: bool) -> list[dict]:
        """Outputs in input order; 504 past limits.timeout_s (queueing in this replica included)."""
        rid = next(self._ids)
        singles = [Single(text, pair, task, return_logits, rid) for text, pair in items]
        self._queue(len(singles))
        try:
            outputs = await asyncio.wait_for(asyncio.gather(*(self.submit(s) for s in singles)),
                                             self.limits.timeout_s)
        except asyncio.TimeoutError:
            self.metrics.rejected.labels("timeout").inc(len(items))
            raise BadRequest(504, "timeout", f"no answer within {self.limits.timeout_s:g} s; retry, or send "
                             "fewer inputs per request") from None
        finally:
            self._queue(-sum(not s.started for s in singles))
        for o in outputs:
            if isinstance(o, BaseException):
                raise o
        return outputs

    async def run_batch(self, singles: list[Single]) -> list:
        """One engine.run for the inputs Ray grouped (off the event loop); an output or a BadRequest each."""
        for s in singles:
            s.started = True
        self._queue(-len(singles))
        try:
            outputs = await asyncio.to_thread(self._run, singles)
        except MergetoolError:  # one input is bad: run them one by one so only its request fails
            return [await self._run_alone(s) for s in singles]
        self._record(singles, outputs)
        return [output_for(o, s.return_logits) for s, o in zip(singles, outputs)]

    async def _run_alone(self, s: Single):
        try:
            out = await asyncio.to_thread(self._run, [s])
        except MergetoolError as exc:
            return BadRequest(422, "invalid_request", str(exc))
        self._record([s], out)
        return output_for(out[0], s.return_logits)

    def _run(self, singles: list[Single]) -> list[dict]:
        return self.engine.run([(s.text, s.pair) for s in singles], [s.task for s in singles],
                               any(s.return_logits for s in singles))

    def _record(self, singles: list[Single], outputs: list[dict]) -> None:
        self.metrics.record_run(outputs, len({s.request for s in singles}), self.engine.chain_names)

    def _queue(self, delta: int) -> None:
        self.queued += delta
        self.metrics.queue_depth.set(self.queued)

    def describe(self) -> dict:
        return self.engine.describe()

    def refresh(self) -> None:
        self.metrics.record_resident(*self.engine.resident())


# The replica's predictor, handed from the deployment's constructor to `replica_app`. Each Ray Serve
# replica is its own actor process, so this holds exactly one. (`serve.ingress(builder)` calls the builder
# with no arguments, right after the constructor, in the replica.)
_REPLICA: Optional[ReplicaPredictor] = None


def replica_app():
    """The ASGI app of this replica (the `serve.ingress` builder)."""
    if _REPLICA is None:
        raise RuntimeError("the mergetool replica has no library loaded")
    return _REPLICA.app


def load_replica(lib: str, limits: ServeLimits, device: str, max_resident: int, submit) -> ReplicaPredictor:
    """In the replica: load and verify the library, warm every chain, build the app over it."""
    global _REPLICA
    from mergetool.inference.runtime import ExpertLibrary  # lazy: torch
    from mergetool.serve.engine import LibraryEngine

    library = ExpertLibrary.load(lib, device=device, max_resident_models=max_resident)
    engine = LibraryEngine(library, batch_size=limits.max_batch)
    engine.warm_up()
    _REPLICA = ReplicaPredictor(engine, limits, submit)
    return _REPLICA


def build_deployment(lib, limits: ServeLimits, *, device: str = "cpu", max_resident: int = 4, replicas: int = 1):
    """The bound Ray Serve application: `replicas` copies of the app, each with its own library.

    `lib` is a folder (passed on as an absolute path: replicas do not share the caller's working directory)
    or a hub ref. max_queued_requests bounds the requests waiting for a replica (see `overload_answer`);
    max_ongoing_requests lets a replica hold enough requests to fill a batch while another runs."""
    from ray import serve

    actor = {"num_cpus": 1, "num_gpus": 1} if device == "cuda" else {"num_cpus": 1}

    @serve.deployment(name="MergetoolReplica", num_replicas=replicas, ray_actor_options=actor,
                      max_ongoing_requests=2 * limits.max_batch, max_queued_requests=limits.max_queue,
                      **overload_answer(serve.deployment, limits))
    @serve.ingress(replica_app)
    class MergetoolReplica:
        def __init__(self, lib: str, limits: ServeLimits, device: str, max_resident: int):
            self.predictor = load_replica(lib, limits, device, max_resident, self.run_one)

        @serve.batch(max_batch_size=limits.max_batch, batch_wait_timeout_s=limits.max_wait_ms / 1000)
        async def run_one(self, singles: list[Single]) -> list:
            return await self.predictor.run_batch(singles)

    return MergetoolReplica.bind(replica_ref(lib), limits, device, max_resident)


def overload_answer(deployment, limits: ServeLimits) -> dict:
    """Past max_queued_requests: 429 with Retry-After, as the embedded server answers a full queue, where
    this Ray's deployments take `backpressure_config` (2.60 does); older ones answer 503. Either way the
    body is Ray's plain text, not {error, detail}."""
    if "backpressure_config" not in inspect.signature(deployment).parameters:
        return {}
    return {"backpressure_config": {"status_code": 429, "retry_after_s": limits.retry_after_s}}


def run_on_ray(lib, limits: ServeLimits, *, host: str, port: int, replicas: int, address: Optional[str],
               device: str, max_resident: int) -> None:
    """Deploy on Ray Serve (a local Ray, or the cluster at `address`) and serve until SIGTERM/SIGINT, then
    take the app down and return (the command exits 0). A library that fails verification is a
    MergetoolError before Ray starts."""
    verify_library(lib)
    port = bindable_port(host, port)
    import ray
    from ray import serve

    options = {"address": address} if address else {"address": "local", "include_dashboard": False}
    patient_proxy()
    ray.init(logging_level=logging.WARNING, **options)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's deploy chatter
    stop = StopOnSignal()
    try:
        with stop:
            device = replica_device(device, ray.cluster_resources())
            serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
            serve.run(build_deployment(lib, limits, device=device, max_resident=max_resident, replicas=replicas),
                      name=APP_NAME, route_prefix="/", logging_config=QUIET)
            print(f"serving {lib} on ray ({replicas} replicas) at http://{host}:{port}", file=sys.stderr, flush=True)
            stop.wait()
    except KeyboardInterrupt:  # a signal while deploying
        pass
    finally:
        with StopOnSignal(interrupt=False):  # a second Ctrl+C must not cut the shutdown short
            if address:
                serve.delete(APP_NAME)  # a shared cluster keeps Serve and its other apps
            else:
                serve.shutdown()
            ray.shutdown()


class StopOnSignal:
    """SIGTERM/SIGINT: before `wait()` interrupt (KeyboardInterrupt, unless interrupt=False), during it
    end the wait."""

    def __init__(self, interrupt: bool = True):
        self.event, self.interrupt, self.serving, self.previous = threading.Event(), interrupt, False, {}

    def __enter__(self) -> "StopOnSignal":
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _handle(self, sig, frame) -> None:
        self.event.set()
        if self.interrupt and not self.serving:
            raise KeyboardInterrupt

    def wait(self) -> None:
        self.serving = True
        while not self.event.wait(0.5):
            pass


def verify_library(lib) -> None:
    """Check the library on the driver (every file's sha256): a bad one is one line, before Ray starts."""
    from mergetool.library.hub import open_library

    open_library(lib)


def replica_ref(lib) -> str:
    """The library as replicas name it: a hub ref as given, a folder as an absolute path."""
    from mergetool.library.hub import is_hub_ref

    return str(lib) if is_hub_ref(str(lib)) else str(Path(lib).resolve())


def bindable_port(host: str, port: int) -> int:
    """`port` if it is free on `host` (0: a free one), or one line naming --host/--port."""
    with bind_socket(host, port) as sock:
        return sock.getsockname()[1]


def replica_device(device: str, resources: dict) -> str:
    """`auto` is decided by the cluster, not the driver: cuda when it has a GPU (a replica that does not ask
    for num_gpus sees none, so `auto` inside it would always be the CPU)."""
    if device != "auto":
        return device
    return "cuda" if resources.get("GPU", 0) >= 1 else "cpu"
