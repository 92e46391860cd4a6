"""Dynamic batching across requests: the only place the server runs the model.

Requests wait in a bounded queue (counted in inputs). The loop takes the first one, waits up to max_wait_ms
for others (or until max_batch inputs are queued), and runs the whole requests it took as one call of
`run(items, tasks, return_logits)`, which routes once, groups by chain and runs one forward per chain batch
(`ExpertLibrary.predict`). Each request gets its own slice back. The model runs in one worker thread, so
the event loop keeps accepting (and refusing) requests meanwhile, and requests queue up into the next batch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from mergetool.core.errors import MergetoolError
from mergetool.serve.limits import ServeLimits
from mergetool.serve.metrics import ServeMetrics
from mergetool.serve.wire import BadRequest, output_for

log = logging.getLogger("mergetool.serve")
RunFn = Callable[[list, list, bool], list]


@dataclass
class QueuedRequest:
    items: list[tuple]
    tasks: list[Optional[str]]
    return_logits: bool
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, run: RunFn, limits: ServeLimits, metrics: Optional[ServeMetrics] = None,
                 on_batch: Optional[Callable[[list[dict], int], None]] = None):
        self.run, self.limits, self.metrics, self.on_batch = run, limits, metrics, on_batch
        self._queue: deque[QueuedRequest] = deque()
        self.queued_inputs = 0
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._event_loop: Optional[asyncio.AbstractEventLoop] = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergetool-model")
        self.closing = False

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="mergetool-batcher")

    async def submit(self, items: list[tuple], task: Optional[str], return_logits: bool) -> list[dict]:
        """Outputs for these inputs, in order; BadRequest for a full queue (429), a timeout (504) or a
        server that is shutting down (503)."""
        if self.closing:
            raise BadRequest(503, "draining", "the server is shutting down; retry on another replica")
        n = len(items)
        if self.queued_inputs + n > self.limits.max_queue:
            if self.metrics:
                self.metrics.rejected.labels("queue_full").inc(n)
            raise BadRequest(429, "queue_full", f"{self.queued_inputs} inputs are queued (limit "
                             f"{self.limits.max_queue}); retry after {self.limits.retry_after_s} s",
                             headers={"Retry-After": str(self.limits.retry_after_s)})
        req = QueuedRequest(items, [task] * n, return_logits, asyncio.get_running_loop().create_future())
        self._queue.append(req)
        self._count(n)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(req.future, self.limits.timeout_s)
        except asyncio.TimeoutError:
            if self.metrics:
                self.metrics.rejected.labels("timeout").inc(n)
            raise BadRequest(504, "timeout", f"no answer within {self.limits.timeout_s:g} s; retry, or send "
                             "fewer inputs per request") from None

    def _count(self, delta: int) -> None:
        self.queued_inputs += delta
        if self.metrics:
            self.metrics.queue_depth.set(self.queued_inputs)

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            if batch is None:
                return
            await self._run(batch)

    async def _collect(self) -> Optional[list[QueuedRequest]]:
        """Whole requests for the next run: the first queued one plus whatever arrives within max_wait_ms,
        up to max_batch inputs. None once closing with an empty queue."""
        while not self._live_head():
            if self.closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._queue[0].queued_at + self.limits.max_wait_ms / 1000
        while self.queued_inputs < self.limits.max_batch and not self.closing:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                break
        batch, size = [], 0
        while self._queue and (not batch or size + len(self._queue[0].items) <= self.limits.max_batch):
            req = self._queue.popleft()
            self._count(-len(req.items))
            if not req.future.done():  # a request that timed out is dropped here
                batch.append(req)
                size += len(req.items)
        return batch

    def _live_head(self) -> bool:
        while self._queue and self._queue[0].future.done():
            self._count(-len(self._queue.popleft().items))
        return bool(self._queue)

    async def _run(self, batch: list[QueuedRequest]) -> None:
        if not batch:
            return
        items = [x for r in batch for x in r.items]
        tasks = [t for r in batch for t in r.tasks]
        logits = any(r.return_logits for r in batch)
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._pool, self.run, items, tasks, logits)
        except MergetoolError:  # one request's input: run them one by one so only it fails
            for r in batch:
                await self._run_alone(r)
            return
        except Exception as exc:  # noqa: BLE001 - the model failed; every request of the batch gets a 500
            log.exception("model run failed")
            for r in batch:
                _settle(r.future, exc=exc)
            return
        self._record(batch, outputs)
        start = 0
        for r in batch:
            _settle(r.future, [output_for(o, r.return_logits) for o in outputs[start:start + len(r.items)]])
            start += len(r.items)

    async def _run_alone(self, r: QueuedRequest) -> None:
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, self.run, r.items, r.tasks,
                                                                   r.return_logits)
        except MergetoolError as exc:
            _settle(r.future, exc=BadRequest(422, "invalid_request", str(exc)))
        except Exception as exc:  # noqa: BLE001 - reported as a 500 for this request only
            log.exception("model run failed")
            _settle(r.future, exc=exc)
        else:
            self._record([r], out)
            _settle(r.future, out)

    def _record(self, batch: list[QueuedRequest], outputs: list[dict]) -> None:
        if self.on_batch:
            self.on_batch(outputs, len(batch))

    def begin_drain(self) -> None:
        """Refuse new requests and run the queued ones now, without waiting out max_wait_ms (safe to call
        from a signal handler or another thread)."""
        self.closing = True
        if self._wakeup is not None:
            self._event_loop.call_soon_threadsafe(self._wakeup.set)

    async def close(self, drain_s: float = 30.0) -> None:
        """Refuse new requests, answer the queued ones (for up to drain_s), then stop the worker."""
        self.begin_drain()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, drain_s)
            except asyncio.TimeoutError:
                self._task.cancel()
        for r in self._queue:
            _settle(r.future, exc=BadRequest(503, "draining", "the server shut down before this request ran"))
        self._pool.shutdown(wait=True)


def _settle(fut: asyncio.Future, result=None, exc: Optional[BaseException] = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
