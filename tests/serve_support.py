"""Helpers for tests/test_serve.py: `mergetool serve` as a real subprocess, Prometheus text, the bad-request table.

A server's stderr goes to a file (never a pipe that could fill up); its port is read from the
"serving LIB (N tasks) on http://HOST:PORT" line, and it is ready once /readyz answers 200."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

SERVING = re.compile(r"serving .+ \(\d+ tasks\) on (http://[\w.\-\[\]:]+:\d+)")
READY_S = 300.0  # start-up on a loaded 2-core machine: imports, verification, warm-up
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def serve_command(lib, *flags) -> list[str]:
    return [sys.executable, "-m", "mergetool", "serve", str(lib), *[str(f) for f in flags]]


class ServerProcess:
    """`mergetool serve LIB --port 0 FLAGS` in the background; `ready()` waits for it, `stop()` ends it."""

    def __init__(self, lib, flags: tuple, log: Path):
        self.log = log
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(serve_command(lib, "--port", 0, "--log-level", "warning", *flags),
                                     stdout=subprocess.DEVNULL, stderr=self._err, env=ENV)
        self.url: Optional[str] = None

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self, timeout: float = READY_S) -> "ServerProcess":
        """Wait for the port line, then for /readyz 200; fail with the server's stderr otherwise."""
        deadline = time.monotonic() + timeout
        while self.url is None:
            found = SERVING.search(self.stderr())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start (rc {self.proc.poll()}):\n{self.stderr()}")
            else:
                time.sleep(0.2)
        while not answers_ok(self.url + "/readyz"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server never got ready (rc {self.proc.poll()}):\n{self.stderr()}")
            time.sleep(0.2)
        return self

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; always reaped."""
        self.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self._err.close()


class ServerPool:
    """Named servers of one library, each started on first use (`launch` starts one ahead of time); a
    server that has exited (a test stopped it) is started afresh by the next `get`."""

    def __init__(self, lib, specs: dict, logs: Path):
        self.lib, self.specs, self.logs = lib, specs, logs
        self.procs: dict[str, ServerProcess] = {}
        self.started = 0

    def launch(self, name: str) -> ServerProcess:
        proc = self.procs.get(name)
        if proc is None or proc.proc.poll() is not None:
            if proc is not None:
                proc.stop()
            self.started += 1
            self.procs[name] = ServerProcess(self.lib, self.specs[name], self.logs / f"{name}-{self.started}.log")
        return self.procs[name]

    def get(self, name: str) -> ServerProcess:
        return self.launch(name).ready()

    def stop_all(self) -> None:
        for proc in self.procs.values():  # all at once: each may take a while to exit on a loaded machine
            proc.terminate()
        for proc in self.procs.values():
            proc.stop()


def answers_ok(url: str) -> bool:
    """GET url answers 200 (False for any other status or no connection)."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# --- Prometheus text ---------------------------------------------------------------------------------------

def samples(text: str) -> dict:
    """{(sample name, sorted label items): value} of a /metrics page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(client: httpx.Client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return samples(r.text)


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def multi_batches(metrics: dict, name: str) -> float:
    """Observations of histogram `name` above 1 (model runs with more than one request or input)."""
    return value(metrics, name + "_count") - value(metrics, name + "_bucket", le="1.0")


# --- answers ------------------------------------------------------------------------------------------------

def assert_same(got: list[dict], want: list[dict], logits: bool) -> None:
    """Server outputs equal ExpertLibrary.predict's: task, label, score (1e-4), truncated, logits/routing."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["task"], g["label"], g["label_id"]) == (w["task"], w["label"], w["label_id"])
        assert g["score"] == pytest.approx(w["score"], abs=1e-4)
        assert g["truncated"] is w.get("truncated", False)
        if not logits:
            assert "logits" not in g and "routing" not in g
            continue
        assert g["logits"] == pytest.approx(w["logits"], abs=1e-4)
        if w.get("routing") is None:
            assert g["routing"] is None
        else:
            assert g["routing"].keys() == w["routing"].keys()
            assert list(g["routing"].values()) == pytest.approx(list(w["routing"].values()), abs=1e-4)


def error_body(r: httpx.Response, status: int, error: str) -> None:
    """r is the JSON error {error, detail} (exactly those two string keys) with this status and code."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"} and all(isinstance(v, str) for v in body.values()), body
    assert body["error"] == error and body["detail"], body


async def _burst(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*[client.post("/v1/predict", json=b) for b in bodies])


def burst(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send all bodies at once, each on its own connection; the responses in order."""
    return asyncio.run(_burst(url, bodies))


def post_in_thread(url: str, body: dict, results: dict, key) -> threading.Thread:
    """POST body in a thread of its own (its own connection); results[key] is the response or the error."""
    def post():
        try:
            results[key] = httpx.post(url + "/v1/predict", json=body, timeout=120)
        except httpx.HTTPError as exc:  # reported by the assertion on results
            results[key] = exc

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def wait_for(check, timeout: float, what: str) -> None:
    """Poll check() until it holds (generous timeouts: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- bad requests: (name, method, path, headers, body, status, error) --------------------------------------

JSON = {"content-type": "application/json"}
MAX_INPUTS, MAX_BODY = 16, 32768  # the shared server's --max-inputs and --max-body


def _post(name, body, status, error, headers=JSON):
    raw = body if isinstance(body, bytes) else body.encode()
    return (name, "POST", "/v1/predict", headers, raw, status, error)


def _chunks():
    for _ in range(10):
        yield b'"' + b"x" * 4000 + b'",'


def _json_cases() -> list:
    bad = [("truncated", '{"inputs": ["a"'), ("truncated-key", '{"inputs"'), ("trailing-garbage", '{"inputs": ["a"]} x'),
           ("two-documents", '{"inputs": ["a"]}{"inputs": ["a"]}'), ("nan", '{"inputs": ["a"], "task": NaN}'),
           ("infinity", '{"inputs": ["a"], "task": Infinity}'), ("minus-infinity", '{"inputs": [-Infinity]}'),
           ("float-overflow", '{"inputs": ["a"], "task": 1e999}'),
           ("deep-10000", '{"inputs": ' + "[" * 10_000 + "]" * 10_000 + "}"),
           ("deep-100", '{"inputs": [' + "[" * 100 + "]" * 100 + "]}"),
           ("huge-integer", '{"inputs": ["a"], "task": ' + "1" * 5000 + "}"),
           ("empty-body", ""), ("whitespace-body", "  \n "), ("single-quotes", "{'inputs': ['a']}"),
           ("trailing-comma", '{"inputs": ["a"],}'), ("unquoted-key", '{inputs: ["a"]}'), ("lone-bracket", "["),
           ("raw-control-char", '{"inputs": ["a\x01b"]}'), ("bad-escape", '{"inputs": ["\\x41"]}')]
    cases = [_post(n, b, 400, "invalid_json") for n, b in bad]
    cases.append(_post("utf8-bom", b'\xef\xbb\xbf{"inputs": ["a"]}', 400, "invalid_json"))
    return cases


def _media_and_encoding_cases() -> list:
    good = b'{"inputs": ["a"]}'
    media = [("text-plain", {"content-type": "text/plain"}), ("form", {"content-type": "application/x-www-form-urlencoded"}),
             ("no-content-type", {}), ("multipart", {"content-type": "multipart/form-data; boundary=xyz"}),
             ("xml", {"content-type": "application/xml"}), ("json-lookalike", {"content-type": "application/jsonx"})]
    cases = [_post(f"media-{n}", good, 415, "unsupported_media_type", headers=h) for n, h in media]
    raw = [("latin-1", '{"inputs": ["café"]}'.encode("latin-1")), ("continuation-byte", b'{"inputs": ["\x80"]}'),
           ("utf-16-bom", '{"inputs": ["a"]}'.encode("utf-16")), ("overlong", b'{"inputs": ["\xc0\xaf"]}'),
           ("cut-multibyte", b'{"inputs": ["\xe2\x82"]}'), ("encoded-surrogate", b'{"inputs": ["\xed\xa0\x80"]}')]
    return cases + [_post(f"encoding-{n}", b, 400, "invalid_encoding") for n, b in raw]


def _shape_cases() -> list:
    bad = [("not-an-object", "[]"), ("null-document", "null"), ("string-document", '"a"'), ("number-document", "42"),
           ("no-inputs", "{}"), ("inputs-null", '{"inputs": null}'), ("inputs-string", '{"inputs": "a"}'),
           ("inputs-object", '{"inputs": {"text": "a"}}'), ("inputs-number", '{"inputs": 5}'),
           ("inputs-empty", '{"inputs": []}'), ("input-null", '{"inputs": [null]}'), ("input-number", '{"inputs": [5]}'),
           ("input-float", '{"inputs": [1.5]}'), ("input-bool", '{"inputs": [true]}'),
           ("input-list", '{"inputs": [["a", "b"]]}'), ("input-empty", '{"inputs": [""]}'),
           ("input-whitespace", '{"inputs": ["  \\n\\t "]}'), ("second-input-null", '{"inputs": ["ok", null]}'),
           ("dict-no-text", '{"inputs": [{"text_pair": "b"}]}'), ("dict-text-null", '{"inputs": [{"text": null}]}'),
           ("dict-text-empty", '{"inputs": [{"text": ""}]}'), ("dict-text-number", '{"inputs": [{"text": 3}]}'),
           ("pair-number", '{"inputs": [{"text": "a", "text_pair": 5}]}'),
           ("pair-list", '{"inputs": [{"text": "a", "text_pair": ["b"]}]}'),
           ("pair-empty", '{"inputs": [{"text": "a", "text_pair": " "}]}'),
           ("input-unknown-key", '{"inputs": [{"text": "a", "label": 1}]}'),
           ("top-unknown-key", '{"inputs": ["a"], "batch_size": 2}'),
           ("lone-surrogate", '{"inputs": ["\\ud800"]}'), ("lone-low-surrogate", '{"inputs": ["x\\udc00y"]}'),
           ("pair-surrogate", '{"inputs": [{"text": "a", "text_pair": "\\ud800"}]}'),
           ("logits-string", '{"inputs": ["a"], "return_logits": "true"}'),
           ("logits-number", '{"inputs": ["a"], "return_logits": 1}'),
           ("logits-null", '{"inputs": ["a"], "return_logits": null}')]
    cases = [_post(n, b, 422, "invalid_request") for n, b in bad]
    tasks = [("task-unknown", '"task9"'), ("task-number", "5"), ("task-empty", '""'), ("task-list", '["task0"]'),
             ("task-object", '{"name": "task0"}')]
    cases += [_post(n, '{"inputs": ["a"], "task": %s}' % t, 422, "unknown_task") for n, t in tasks]
    over = '{"inputs": [%s]}' % ", ".join(['"w1"'] * (MAX_INPUTS + 1))
    cases.append(_post("too-many-inputs", over, 422, "too_many_inputs"))
    return cases


def _size_and_route_cases() -> list:
    big = b'{"inputs": ["' + b"w1 " * (MAX_BODY // 3 + 10) + b'"]}'
    cases = [_post("body-over-limit", big, 413, "body_too_large"),
             ("body-over-limit-chunked", "POST", "/v1/predict", JSON, _chunks, 413, "body_too_large")]
    methods = [("GET", "/v1/predict"), ("PUT", "/v1/predict"), ("DELETE", "/v1/predict"), ("PATCH", "/v1/predict"),
               ("POST", "/healthz"), ("POST", "/v1/library"), ("POST", "/metrics")]
    cases += [(f"{m}-{p}", m, p, {}, b"", 405, "method_not_allowed") for m, p in methods]
    paths = [("GET", "/nope"), ("GET", "/v1"), ("POST", "/v2/predict"), ("GET", "/v1/predict/extra"),
             ("POST", "/v1/predict/")]  # no redirect to the slash-less path: a JSON 404
    return cases + [(f"{m}-{p}", m, p, {}, b"", 404, "not_found") for m, p in paths]


BAD_REQUESTS = _json_cases() + _media_and_encoding_cases() + _shape_cases() + _size_and_route_cases()
