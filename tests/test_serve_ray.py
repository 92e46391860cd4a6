"""`mergetool serve --ray`: the app deployed on a local Ray Serve (one replica), over HTTP.

One Ray instance for the module, started in the test process and always shut down in teardown."""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import httpx
import pytest

from mergetool.serve.limits import ServeLimits

pytestmark = pytest.mark.slow

TEXTS = ["w0 w1 w5 w7 w30 w41", "w2 w3 w20 w22 w24 w9", ("w4 w6 w33", "w8 w10 w11"), "w11 w10 w50 w51 w52 w1"]
LIMITS = ServeLimits(max_batch=64, max_wait_ms=200, timeout_s=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(routed):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from mergetool.serve.ray_deploy import APP_NAME, QUIET, build_deployment, patient_proxy

    port = free_port()
    patient_proxy()  # the CI machine may be busy: Ray's 5 s proxy readiness check would kill the proxy
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
        serve.run(build_deployment(routed["lib"], LIMITS, device="cpu", max_resident=4), name=APP_NAME,
                  route_prefix="/", logging_config=QUIET)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def http(ray_url):
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        yield client


def as_json(item):
    return item if isinstance(item, str) else {"text": item[0], "text_pair": item[1]}


@pytest.mark.parametrize("task", [None, "task1"])
def test_round_trip_matches_the_library(routed, http, task):
    from mergetool.inference.runtime import ExpertLibrary

    expected = ExpertLibrary.load(routed["lib"], device="cpu").predict(TEXTS, task=task)
    body = {"inputs": [as_json(x) for x in TEXTS]} | ({"task": task} if task else {})
    r = http.post("/v1/predict", json=body)
    assert r.status_code == 200, r.text
    got = r.json()["outputs"]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):  # in input order
        assert (g["task"], g["label"], g["label_id"]) == (e["task"], e["label"], e["label_id"])
        assert g["score"] == pytest.approx(e["score"], abs=1e-4)
        assert "logits" not in g and "routing" not in g
    if task:
        assert {g["task"] for g in got} == {task}


def test_logits_only_when_asked(http):
    r = http.post("/v1/predict", json={"inputs": TEXTS[:2], "return_logits": True})
    assert r.status_code == 200, r.text
    assert all(o["logits"] and o["routing"] for o in r.json()["outputs"])


def test_ready_and_library(http):
    assert http.get("/readyz").json() == {"status": "ready"}
    assert [t["name"] for t in http.get("/v1/library").json()["tasks"]] == ["task0", "task1", "task2"]


def batch_counts(http) -> tuple[float, float]:
    """(model runs, model runs of one input) from the replica's /metrics."""
    text = http.get("/metrics").text
    total = re.search(r"^mergetool_batch_inputs_count (\S+)$", text, re.M)
    single = re.search(r'^mergetool_batch_inputs_bucket\{le="1\.0"\} (\S+)$', text, re.M)
    assert total and single, text
    return float(total.group(1)), float(single.group(1))


def test_concurrent_requests_share_model_runs(ray_url, http):
    runs0, singles0 = batch_counts(http)

    async def burst():
        async with httpx.AsyncClient(base_url=ray_url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json={"inputs": [as_json(TEXTS[i % 4])]})
                                          for i in range(32)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32
    runs, singles = batch_counts(http)
    assert runs - runs0 < 32  # 32 one-input requests took fewer model runs
    assert (runs - runs0) - (singles - singles0) >= 1  # at least one run held several inputs
    text = http.get("/metrics").text
    assert re.search(r'^mergetool_chain_inputs_total\{chain="task1\+task2"\} ', text, re.M) or \
        re.search(r'^mergetool_chain_inputs_total\{chain="task0"\} ', text, re.M)


@pytest.mark.parametrize("send, status, error", [
    (dict(json={"inputs": []}), 422, "invalid_request"),
    (dict(json={"inputs": ["w1"], "task": "nope"}), 422, "unknown_task"),
    (dict(content=b'{"inputs": ["w1"]}', headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    (dict(content=b'{"inputs": [', headers={"content-type": "application/json"}), 400, "invalid_json"),
])
def test_bad_request_is_a_json_4xx(http, send, status, error):
    r = http.post("/v1/predict", **send)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "detail"} and r.json()["error"] == error
    assert http.get("/healthz").status_code == 200  # and the replica keeps serving
