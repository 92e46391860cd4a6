"""`mergetool serve`: real server processes driven over HTTP (round trip, batching, hostile requests, 429, 504,
graceful drain, start-up errors, docs, the client), and the Batcher on its own.

The server processes are started once per module: the shared one first, then (while tests use it) the
special ones in the background; every process is stopped (SIGTERM, then SIGKILL) in teardown."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess

import httpx
import pytest
from serve_support import (
    BAD_REQUESTS,
    ENV,
    MAX_BODY,
    MAX_INPUTS,
    ServerPool,
    answers_ok,
    assert_same,
    burst,
    error_body,
    multi_batches,
    post_in_thread,
    scrape,
    serve_command,
    value,
    wait_for,
)

CPU = ("--device", "cpu")
SPECS = {  # name -> flags; "main" is shared by every test that needs no special limits
    "main": (*CPU, "--max-wait-ms", 200, "--max-inputs", MAX_INPUTS, "--max-body", MAX_BODY),
    # the first request waits 3 s for others while the queue holds 4 inputs: the rest of a burst gets 429;
    # the drain test then queues 4 inputs and stops it with SIGTERM
    "slow": (*CPU, "--max-queue", 4, "--max-inputs", 4, "--max-batch", 8, "--max-wait-ms", 3000),
    "timeout": (*CPU, "--timeout", 0.05, "--max-wait-ms", 1000),
}


@pytest.fixture(scope="module")
def servers(routed, tmp_path_factory):
    pool = ServerPool(routed["lib"], SPECS, tmp_path_factory.mktemp("serve-logs"))
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def server(servers):
    """The shared server; once it is up, the others start loading in the background."""
    main = servers.get("main")
    for name in SPECS:
        servers.launch(name)
    return main


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def library(routed):
    from mergetool.inference.runtime import ExpertLibrary

    return ExpertLibrary.load(routed["lib"], device="cpu")


@pytest.fixture(scope="module")
def texts(routed):
    """Test texts of all three tasks, interleaved at random (so routed outputs mix chains)."""
    rows = [json.loads(line)["text"] for t in ("task0", "task1", "task2")
            for line in routed["zoo"]["data"][t]["test"].read_text().splitlines()[:20]]
    random.Random(0).shuffle(rows)
    return rows


def predict(http: httpx.Client, inputs: list, **extra) -> list[dict]:
    r = http.post("/v1/predict", json={"inputs": inputs, **extra})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


# --- 1. round trip ---------------------------------------------------------------------------------------

LONG = " ".join(["w1"] * 200)  # far over the router's 32 tokens
ROUND_TRIPS = {  # name -> (inputs from texts, task)
    "routed": (lambda t: t[:12], None),
    "task": (lambda t: t[:6], "task0"),
    "pairs": (lambda t: [{"text": a, "text_pair": b} for a, b in zip(t[:4], t[4:8])], None),
    "mixed": (lambda t: [t[0], {"text": t[1], "text_pair": t[2]}, {"text": t[3]}, t[4],
                         {"text": t[5], "text_pair": None}, {"text": t[6], "text_pair": t[7]}], None),
    "truncated": (lambda t: [t[0], LONG, {"text": LONG, "text_pair": t[1]}, t[2]], None),
}


@pytest.mark.slow
@pytest.mark.parametrize("logits", [False, True], ids=["plain", "logits"])
@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_equals_library_predict(http, library, texts, case, logits):
    make, task = ROUND_TRIPS[case]
    inputs = make(texts)
    extra = ({"task": task} if task else {}) | ({"return_logits": True} if logits else {})
    got = predict(http, inputs, **extra)
    want = library.predict(inputs, task=task, return_logits=logits)
    assert_same(got, want, logits)
    if case == "routed":
        assert len({o["task"] for o in got}) > 1  # several chains in one request, answered in input order
    if case == "truncated":
        assert [o["truncated"] for o in got] == [False, True, True, False]
    if logits and task is None:
        assert all(sum(o["routing"].values()) == pytest.approx(1, abs=1e-4) for o in got)


# --- 2. batching -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_concurrent_requests_share_model_runs(server, http, library, texts):
    kinds = [{}, {"task": "task0"}, {"return_logits": True}, {"task": "task2", "return_logits": True}]
    bodies = [{"inputs": [t if i % 3 else {"text": t, "text_pair": texts[i + 1]}], **kinds[i % 4]}
              for i, t in enumerate(texts[:40])]  # routed and task-given, with and without logits, in one burst
    before = scrape(http)
    answers = burst(server.url, bodies)
    assert [r.status_code for r in answers] == [200] * 40, [r.text for r in answers if r.status_code != 200]
    for body, r in zip(bodies, answers):
        logits = body.get("return_logits", False)
        want = library.predict(body["inputs"], task=body.get("task"), return_logits=logits)
        assert_same(r.json()["outputs"], want, logits)
    after = scrape(http)
    assert multi_batches(after, "mergetool_batch_requests") > multi_batches(before, "mergetool_batch_requests")
    assert multi_batches(after, "mergetool_batch_inputs") > multi_batches(before, "mergetool_batch_inputs")
    chains = {dict(k[1])["chain"] for k in after if k[0] == "mergetool_chain_inputs_total"}
    assert chains and chains <= {"task0", "task1+task2"}
    ran = sum(value(after, "mergetool_chain_inputs_total", chain=c)
              - value(before, "mergetool_chain_inputs_total", chain=c) for c in chains)
    assert ran == 40
    assert ("mergetool_resident_chains", ()) in after and value(after, "mergetool_resident_chains") >= 1


# --- 3. hostile requests ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,method,path,headers,body,status,error", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_a_json_4xx(http, name, method, path, headers, body, status, error):
    content = body() if callable(body) else body  # a generator: chunked, no Content-Length
    r = http.request(method, path, headers=headers, content=content)
    error_body(r, status, error)
    if name == "body-over-limit-chunked":
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"


@pytest.mark.slow
def test_server_survives_bad_requests(http, library, texts):
    assert len(BAD_REQUESTS) >= 50
    statuses = [dict(k[1])["status"] for k in scrape(http) if k[0] == "mergetool_requests_total"]
    assert statuses and not [s for s in statuses if s.startswith("5")]
    assert_same(predict(http, texts[:3]), library.predict(texts[:3]), False)


# --- 4, 5, 6. backpressure, timeouts, drain ---------------------------------------------------------------

@pytest.mark.slow
def test_overload_answers_429_with_retry_after(servers, library, texts):
    srv = servers.get("slow")
    answers = burst(srv.url, [{"inputs": [t]} for t in texts[:16]])
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for t, r in zip(texts, answers):
        if r.status_code == 429:
            error_body(r, 429, "queue_full")
            assert r.headers["retry-after"] == "1"
        else:
            assert_same(r.json()["outputs"], library.predict([t]), False)
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        assert_same(predict(client, texts[:4]), library.predict(texts[:4]), False)
        rejected = value(scrape(client), "mergetool_rejected_inputs_total", reason="queue_full")
    assert rejected == statuses.count(429)


@pytest.mark.slow
def test_timeout_answers_504_and_keeps_serving(servers):
    srv = servers.get("timeout")
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        for _ in range(2):
            error_body(client.post("/v1/predict", json={"inputs": ["w1 w2"]}), 504, "timeout")
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        assert value(scrape(client), "mergetool_rejected_inputs_total", reason="timeout") == 2


@pytest.mark.slow
def test_sigterm_drains_queued_requests_and_exits_0(servers, library, texts):
    srv = servers.get("slow")
    bodies = [{"inputs": [texts[0]]}, {"inputs": [{"text": texts[1], "text_pair": texts[2]}]},
              {"inputs": texts[3:5], "task": "task2", "return_logits": True}]
    results: dict = {}
    threads = [post_in_thread(srv.url, b, results, i) for i, b in enumerate(bodies)]
    with httpx.Client(base_url=srv.url, timeout=30) as client:  # all 4 inputs wait in the queue (3 s)
        wait_for(lambda: value(scrape(client), "mergetool_queue_inputs") == 4, 60, "the queued inputs")
    srv.terminate()
    wait_for(lambda: not answers_ok(srv.url + "/readyz"), 30, "/readyz to stop answering 200 after SIGTERM")
    for thread in threads:
        thread.join(timeout=120)
    for i, body in enumerate(bodies):
        r = results.get(i)
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        want = library.predict(body["inputs"], task=body.get("task"), return_logits=bool(body.get("return_logits")))
        assert_same(r.json()["outputs"], want, bool(body.get("return_logits")))
    assert srv.proc.wait(timeout=60) == 0, srv.stderr()
    assert "Traceback" not in srv.stderr()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/readyz", timeout=5)


# --- 7. start-up errors ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_startup_errors_are_one_line_and_exit_2(routed, tmp_path):
    flipped = tmp_path / "flipped"
    shutil.copytree(routed["lib"], flipped)
    shard = sorted(flipped.glob("experts-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF  # a weight, not the header: only the checksum can tell
    shard.write_bytes(bytes(data))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = {"checksum mismatch": (flipped, "--port", 0),
                 "cannot listen": (routed["lib"], "--port", taken.getsockname()[1]),
                 "--ray": (routed["lib"], "--port", 0, "--replicas", 2),
                 "--max-inputs": (routed["lib"], "--port", 0, "--max-queue", 4),
                 "--log-level": (routed["lib"], "--port", 0, "--log-level", "nonsense")}
        procs = {needle: subprocess.Popen(serve_command(*args, *CPU), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=ENV) for needle, args in cases.items()}
        try:
            done = {needle: (p.communicate(timeout=180), p.returncode) for needle, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for needle, ((out, err), rc) in done.items():
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and needle in errors[0], (needle, rc, err)
        assert "Traceback" not in err and not out.strip(), err


# --- 8, 9. description, docs, client ---------------------------------------------------------------------

@pytest.mark.slow
def test_library_health_and_docs(http):
    lib = http.get("/v1/library").json()
    tasks = {t["name"]: t for t in lib["tasks"]}
    assert sorted(tasks) == ["task0", "task1", "task2"] and lib["chains"] == 2
    assert tasks["task1"]["chain"] == tasks["task2"]["chain"] != tasks["task0"]["chain"]
    assert 0 < lib["storage_cost"] <= lib["storage_cost_with_heads"]
    router = lib["router"]
    assert router["features"] and router["max_length"] == lib["max_length"]
    assert 0 <= router["routing_accuracy"] <= 1 and sorted(router["routing_accuracy_per_task"]) == sorted(tasks)
    assert http.get("/healthz").json() == {"status": "ok"} and http.get("/readyz").status_code == 200
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    post = http.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert {"inputs", "task", "return_logits"} <= set(schema["properties"]) and "inputs" in schema["required"]
    assert {"200", "413", "415", "422", "429", "504"} <= set(post["responses"])


@pytest.mark.slow
def test_client_matches_raw_http(server, http, texts):
    from mergetool.serve import Client
    from mergetool.serve.client import ServeError

    inputs = [texts[0], {"text": texts[1], "text_pair": texts[2]}, texts[3]]
    with Client(server.url) as client:
        assert client.ready()
        assert_same(client.predict(inputs), predict(http, inputs), False)
        got = client.predict(inputs, task="task1", return_logits=True)
        assert_same(got, predict(http, inputs, task="task1", return_logits=True), True)
        assert [t["name"] for t in client.library()["tasks"]] == ["task0", "task1", "task2"]
        with pytest.raises(ServeError) as caught:
            client.predict([])
        assert (caught.value.status, caught.value.error) == (422, "invalid_request") and caught.value.detail
        with pytest.raises(ServeError) as caught:
            client.predict(["a"], task="nope")
        assert (caught.value.status, caught.value.error) == (422, "unknown_task")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", timeout=5) as nobody:
        assert not nobody.ready()
