"""The Batcher on its own (no HTTP): whole requests per model run, order, queue limit, timeouts, drain; and
the server's limits and OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from pydantic import ValidationError

from mergetool.core.errors import MergetoolError
from mergetool.serve.batcher import Batcher
from mergetool.serve.limits import ServeLimits
from mergetool.serve.wire import BadRequest

# --- 10. the Batcher alone -------------------------------------------------------------------------------

class FakeRun:
    """A model that records its calls; each output names its input (and always carries logits)."""

    def __init__(self, fail_on: str = ""):
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def __call__(self, items, tasks, return_logits):
        self.calls.append((list(items), list(tasks), return_logits))
        if self.fail_on and any(text == self.fail_on for text, _ in items):
            raise MergetoolError(f"cannot read input {self.fail_on!r}", key="inputs")
        return [{"task": t or "routed", "label": text, "label_id": 0, "score": 1.0, "truncated": False,
                 "logits": [0.0], "routing": None} for (text, _), t in zip(items, tasks)]


def singles(*texts) -> list[tuple]:
    return [(t, None) for t in texts]


async def _with_batcher(run, limits: ServeLimits, body):
    batcher = Batcher(run, limits)
    await batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close(drain_s=10)


def test_batcher_runs_requests_together_as_one_call():
    run = FakeRun()
    requests = [(singles("a", "b"), None, False), ([("c", "d")], "task0", True), (singles("e", "f", "g"), None, False)]

    async def body(b):
        return await asyncio.gather(*[b.submit(*r) for r in requests])

    out = asyncio.run(_with_batcher(run, ServeLimits(max_wait_ms=50), body))
    assert run.calls == [([("a", None), ("b", None), ("c", "d"), *singles("e", "f", "g")],
                          [None, None, "task0", None, None, None], True)]
    assert [[o["label"] for o in r] for r in out] == [["a", "b"], ["c"], ["e", "f", "g"]]
    assert [o["task"] for o in out[1]] == ["task0"] and out[1][0]["logits"] == [0.0]
    assert all("logits" not in o and "routing" not in o for o in out[0] + out[2])


def test_batcher_keeps_requests_whole_up_to_max_batch():
    run = FakeRun()

    async def body(b):
        return await asyncio.gather(b.submit(singles("a", "b"), None, False), b.submit(singles("c", "d"), None, False),
                                    b.submit(singles("e"), None, False), b.submit(singles(*"vwxyz"), None, False))

    out = asyncio.run(_with_batcher(run, ServeLimits(max_batch=3, max_wait_ms=50), body))
    assert [[x[0] for x in c[0]] for c in run.calls] == [["a", "b"], ["c", "d", "e"], list("vwxyz")]
    assert [[o["label"] for o in r] for r in out] == [["a", "b"], ["c", "d"], ["e"], list("vwxyz")]


def test_batcher_queue_limit_and_close_answer_queued_requests():
    run = FakeRun()

    async def body(b):
        queued = [asyncio.create_task(b.submit(singles("a", "b"), None, False)),
                  asyncio.create_task(b.submit(singles("c"), None, False))]
        await asyncio.sleep(0.05)  # both queued; the batcher waits up to 60 s for more
        assert b.queued_inputs == 3 and run.calls == []
        with pytest.raises(BadRequest) as full:
            await b.submit(singles("d"), None, False)
        assert (full.value.status, full.value.error, full.value.headers) == (429, "queue_full", {"Retry-After": "1"})
        await b.close(drain_s=10)  # runs the queued requests at once
        with pytest.raises(BadRequest) as closed:
            await b.submit(singles("e"), None, False)
        assert closed.value.status == 503
        return [await q for q in queued]

    out = asyncio.run(_with_batcher(run, ServeLimits(max_wait_ms=60_000, max_queue=3, max_inputs=3), body))
    assert [[o["label"] for o in r] for r in out] == [["a", "b"], ["c"]] and len(run.calls) == 1


def test_batcher_timeout_and_one_bad_request_in_a_batch():
    async def late(b):
        with pytest.raises(BadRequest) as late:
            await b.submit(singles("a"), None, False)
        assert (late.value.status, late.value.error) == (504, "timeout")

    run = FakeRun()
    asyncio.run(_with_batcher(run, ServeLimits(max_wait_ms=5000, timeout_s=0.05), late))
    assert run.calls == []  # the timed-out request never reached the model

    async def mixed(b):
        return await asyncio.gather(b.submit(singles("a"), None, False), b.submit(singles("bad"), None, False),
                                    b.submit(singles("c"), None, False), return_exceptions=True)

    out = asyncio.run(_with_batcher(FakeRun(fail_on="bad"), ServeLimits(max_wait_ms=50), mixed))
    assert [o["label"] for o in out[0]] == ["a"] and [o["label"] for o in out[2]] == ["c"]
    assert isinstance(out[1], BadRequest) and (out[1].status, out[1].error) == (422, "invalid_request")


def test_begin_drain_runs_queued_requests_without_waiting_out_max_wait():
    run = FakeRun()

    async def body(b):
        queued = asyncio.create_task(b.submit(singles("a"), None, False))
        await asyncio.sleep(0.05)
        assert run.calls == []  # waiting up to 60 s for more inputs
        b.begin_drain()  # what SIGTERM does
        out = await asyncio.wait_for(queued, 5)
        with pytest.raises(BadRequest) as closed:
            await b.submit(singles("b"), None, False)
        assert closed.value.status == 503
        return out

    out = asyncio.run(_with_batcher(run, ServeLimits(max_wait_ms=60_000), body))
    assert [o["label"] for o in out] == ["a"]


def test_a_request_always_fits_an_empty_queue():
    with pytest.raises(ValidationError, match="max_inputs"):
        ServeLimits(max_queue=4)  # 256 inputs per request could never be queued: retry-forever 429s
    assert ServeLimits(max_queue=4, max_inputs=4).max_inputs == 4


def test_openapi_document_has_no_dangling_references():
    from fastapi.testclient import TestClient

    from mergetool.serve.app import create_app

    class NoModel:
        tasks = ["t"]

        async def predict(self, items, task, return_logits):
            return []

        def describe(self):
            return {}

    doc = TestClient(create_app(NoModel(), ServeLimits())).get("/openapi.json").json()
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc)))
    for ref in refs:
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, ref
            node = node[part]
    body = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "text_pair" in json.dumps(body)  # the {text, text_pair} form is documented inline
