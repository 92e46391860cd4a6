"""Serving benchmark: `mergetool serve` under closed-loop load, beside the same server on one static merge.

    python benchmarks/serve.py                          # trained toy zoo (built under --workdir)
    python benchmarks/serve.py --zoo demo               # the MiniLM demo zoo (examples/build_demo_zoo.py)

Two libraries are exported from the same zoo: (a) MERGE, embeddings and the first half of the layers shared
and the rest per task (or --grouping), routed on `prefix` features; (b) one static merge (every component
shared, one chain), routed the same way to pick each input's head: the server a user would otherwise deploy.
Each is served by `mergetool serve` in its own process and loaded by C closed-loop clients (asyncio + httpx;
each client sends one mixed-task test input per request and waits for the answer), C in --clients, for
--seconds each. Reported: throughput, p50/p95/p99 latency, mean batch size (the server's /metrics), errors
and dropped requests. Then a --soak at 128 clients on (a), sampling the server's RSS each second (peak, and
the slope over the last minute), and a fault: kill -9 under load, restart, time to /readyz and to the first
answer; every answer during the fault is checked against (a)'s earlier answer for the same input.
Goals (at 32 clients): throughput >= 0.8 x the static server's, p99 <= 2 x its p99, 0 errors, 0 dropped;
soak peak RSS <= the resident-chain cache's bound + 300 MB and no upward trend over the last minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_block  # noqa: E402
from inference import demo_recipe, export, prefix_grouping, stream, toy_recipe  # noqa: E402

BLOCK = "serve-benchmark"
say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731


class ServerProcess:
    """`mergetool serve LIB --port 0` as a child process; its URL, PID and RSS."""

    def __init__(self, lib: Path, extra: list[str], log: Path, port: int = 0):
        self.lib, self.extra, self.log, self.port = lib, extra, log, port
        self.proc, self.url = None, None

    def start(self, timeout: float = 300) -> float:
        """Start it; the seconds until /readyz answers 200."""
        t0 = time.perf_counter()
        self.logf = self.log.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "mergetool", "serve", str(self.lib), "--port", str(self.port),
                                      "--log-level", "warning", *self.extra], stderr=subprocess.PIPE,
                                     stdout=self.logf, text=True)
        line = self.proc.stderr.readline()
        m = re.search(r"on (http://\S+)", line)
        if not m:
            raise RuntimeError(f"server did not start: {line}{self.proc.stderr.read()[-2000:]}")
        self.url = m.group(1)
        while time.perf_counter() - t0 < timeout:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server not ready")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            self.logf.close()


async def closed_loop(url: str, inputs: list[str], clients: int, seconds: float, seen: dict | None = None,
                      during=None) -> dict:
    """C clients, each sending one input per request for `seconds`; latencies of the answered ones."""
    lat, errors, sent, answered, wrong = [], {}, 0, 0, 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(k: int, http: httpx.AsyncClient):
        nonlocal sent, answered, wrong
        i = k
        while time.perf_counter() < stop:
            text = inputs[i % len(inputs)]
            i += clients
            sent += 1
            t = time.perf_counter()
            try:
                r = await http.post("/v1/predict", json={"inputs": [text]})
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.05)
                continue
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                continue
            answered += 1
            lat.append(time.perf_counter() - t)
            out = r.json()["outputs"][0]
            if seen is not None:
                key = (out["task"], out["label"])
                wrong += seen.setdefault(text, key) != key

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        jobs = [asyncio.create_task(client(k, http)) for k in range(clients)]
        if during is not None:
            await during()
        await asyncio.gather(*jobs)
        wall = time.perf_counter() - t0
    lat_ms = np.asarray(lat) * 1000 if lat else np.asarray([np.nan])
    return {"clients": clients, "sent": sent, "answered": answered, "rps": answered / wall,
            "p50": float(np.percentile(lat_ms, 50)), "p95": float(np.percentile(lat_ms, 95)),
            "p99": float(np.percentile(lat_ms, 99)), "errors": errors, "wrong": wrong,
            "dropped": sent - answered - sum(errors.values())}


def load_levels(server: ServerProcess, inputs, levels, seconds, seen) -> list[dict]:
    rows = []
    asyncio.run(closed_loop(server.url, inputs, 8, 2.0))  # warm-up: every chain assembled, caches hot
    for c in levels:
        s0, n0 = server.metric("mergetool_batch_inputs_sum"), server.metric("mergetool_batch_inputs_count")
        row = asyncio.run(closed_loop(server.url, inputs, c, seconds, seen))
        s1, n1 = server.metric("mergetool_batch_inputs_sum"), server.metric("mergetool_batch_inputs_count")
        row["batch"] = (s1 - s0) / max(n1 - n0, 1)
        say(f"  {c:4d} clients: {row['rps']:.1f} req/s, p50 {row['p50']:.0f} ms, p99 {row['p99']:.0f} ms, "
            f"batch {row['batch']:.1f}, errors {row['errors']}")
        rows.append(row)
    return rows


def offline_rate(lib: Path, inputs: list[str], batch: int = 64, seconds: float = 15.0) -> float:
    """Inputs/s of ExpertLibrary.predict itself in `batch`-input calls, in this process: the ceiling a
    server can approach."""
    from mergetool.inference.runtime import ExpertLibrary

    library = ExpertLibrary.load(lib)
    library.predict(inputs[:batch], batch_size=batch)
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        start = done % (len(inputs) - batch)
        library.predict(inputs[start:start + batch], batch_size=batch)
        done += batch
    return done / (time.perf_counter() - t0)


def soak(server: ServerProcess, inputs, clients: int, seconds: float) -> dict:
    samples: list[tuple[float, float]] = []

    async def sample():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            samples.append((time.perf_counter() - t0, server.rss_mb()))
            await asyncio.sleep(1.0)

    row = asyncio.run(closed_loop(server.url, inputs, clients, seconds, during=sample))
    t, rss = np.asarray(samples).T
    last = t >= t[-1] - 60
    slope = float(np.polyfit(t[last], rss[last], 1)[0] * 60) if last.sum() > 2 else float("nan")
    row.update(peak_rss=float(rss.max()), slope_mb_per_min=slope, start_rss=float(rss[0]))
    return row


def fault(server: ServerProcess, inputs, seen: dict, clients: int) -> dict:
    """kill -9 under load, restart on the same port; the seconds until ready and until answering again.
    The clients keep going: connection errors while it is down, then answers again."""
    out: dict = {}

    async def kill_and_restart():
        await asyncio.sleep(3.0)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        t0 = time.perf_counter()
        out["ready_s"] = await asyncio.to_thread(server.start)
        async with httpx.AsyncClient(base_url=server.url) as http:
            while (await http.post("/v1/predict", json={"inputs": [inputs[0]]})).status_code != 200:
                await asyncio.sleep(0.05)
        out["serving_s"] = time.perf_counter() - t0

    row = asyncio.run(closed_loop(server.url, inputs, clients, 20.0, seen, during=kill_and_restart))
    row.update(out)
    return row


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def libraries(args, work: Path):
    from mergetool.models.plan import build_plan, open_models
    from mergetool.recipe import load_recipe

    path = toy_recipe(work) if args.zoo == "toy" else demo_recipe(
        work, args.zoo_dir or Path.home() / ".cache" / "mergetool" / "demo")
    recipe = load_recipe(path)
    sources = open_models(recipe)
    plan = build_plan(recipe, sources=sources, check_values=False)
    if args.grouping:
        from mergetool.cli.library_cmds import read_grouping

        G = read_grouping(args.grouping, plan)[0]
    else:
        n_layers = 1 + max(c.layer for c in plan.components if c.layer is not None)
        G = prefix_grouping(plan, n_layers // 2)
    merge, static = work / "lib-merge", work / "lib-static"
    if not (merge / "manifest.json").is_file():
        export(recipe, plan, sources, G, merge, "prefix")
    if not (static / "manifest.json").is_file():
        export(recipe, plan, sources, np.zeros((plan.T, plan.L), int), static, "prefix")
    texts, _, _ = stream(recipe, args.n, args.seed)
    return recipe, G, merge, static, texts


def cache_bound_mb(lib: Path, max_resident: int) -> float:
    """The resident-chain cache's bound: max_resident whole fp32 models (no sharing counted) + router."""
    from mergetool.library.reader import LibraryFiles

    m = LibraryFiles.load(lib, verify=False).manifest
    chains = len({tuple(c) for c in m.chains.values()})
    one = sum(c.params for c in m.components) * 4 + m.storage.head_data_bytes
    return (min(chains, max_resident) * one + m.disk_bytes.get("router", 0)) / 2**20


def table(rows_a, rows_b) -> list[str]:
    lines = ["| clients | server | req/s | p50 ms | p95 ms | p99 ms | mean batch | errors | dropped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, b in zip(rows_a, rows_b):
        for name, r in (("MERGE library", a), ("static merge", b)):
            lines.append(f"| {r['clients']} | {name} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | "
                         f"{r['p99']:.0f} | {r['batch']:.1f} | {sum(r['errors'].values())} | {r['dropped']} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", choices=("toy", "demo"), default="toy")
    ap.add_argument("--zoo-dir", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="libraries (reused when present); default: temp")
    ap.add_argument("--grouping", type=Path, default=None, help="G of the MERGE library, JSON {grouping}")
    ap.add_argument("--n", type=int, default=1000, help="mixed test inputs the clients cycle through")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=float, default=20.0, help="per load level")
    ap.add_argument("--soak", type=float, default=120.0, help="seconds at 128 clients")
    ap.add_argument("--max-resident", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="", help="extra `mergetool serve` flags for both servers")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergetool-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe, G, merge_lib, static_lib, texts = libraries(args, work)
    extra = ["--max-resident", str(args.max_resident), *shlex.split(args.serve_args)]
    seen: dict = {}
    results = {}
    offline = {name: offline_rate(lib, texts) for name, lib in (("merge", merge_lib), ("static", static_lib))}
    say(f"offline ExpertLibrary.predict, 64-input calls: {offline}")
    for name, lib in (("merge", merge_lib), ("static", static_lib)):
        server = ServerProcess(lib, extra, work / f"{name}.log")
        ready = server.start()
        say(f"{name}: ready in {ready:.1f} s at {server.url}")
        results[name] = load_levels(server, texts, args.clients, args.seconds, seen if name == "merge" else None)
        if name == "merge":
            soak_row = soak(server, texts, 128, args.soak) if args.soak > 0 else None
        assert server.stop() == 0, "the server did not exit 0 on SIGTERM"
    server = ServerProcess(merge_lib, extra, work / "fault.log", port=free_port())
    server.start()
    fault_row = fault(server, texts, seen, 32)
    server.stop()
    block = report(args, argv, recipe, G, results, soak_row, fault_row, cache_bound_mb(merge_lib, args.max_resident),
                   offline)
    print(block)
    if not args.no_write:
        cmd = "python benchmarks/serve.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        write_block(BLOCK, f"Serving under load ({args.zoo} zoo): `mergetool serve` vs one static merge", block,
                    cmd, f"stream {args.seed}")
    return 0


def report(args, argv, recipe, G, results, soak_row, fault_row, bound, offline) -> str:
    a = next(r for r in results["merge"] if r["clients"] == 32) if 32 in args.clients else results["merge"][-1]
    b = next(r for r in results["static"] if r["clients"] == a["clients"])
    tput, p99 = a["rps"] / b["rps"], a["p99"] / b["p99"]
    clean = not a["errors"] and a["dropped"] == 0 and not b["errors"] and b["dropped"] == 0
    met = lambda ok: "met" if ok else "**NOT met**"  # noqa: E731
    lines = [f"Each client sends one mixed-task test input per request (a stream of {len(set(args.clients))} "
             f"levels × {args.seconds:g} s; {args.n} inputs, uniform over T = {len(recipe.task_names)} tasks). "
             f"Both servers: `mergetool serve` defaults (max batch 64, max wait 10 ms) {args.serve_args}. "
             f"MERGE grouping: {np.asarray(G).tolist()}.", ""]
    lines += table(results["merge"], results["static"])
    lines += ["", f"- the ceiling: `ExpertLibrary.predict` itself, in 64-input calls in one process, runs "
              f"{offline['merge']:.1f} inputs/s (MERGE library) and {offline['static']:.1f} (static merge); at "
              f"{max(args.clients)} clients the servers reach {results['merge'][-1]['rps'] / offline['merge']:.0%} "
              f"and {results['static'][-1]['rps'] / offline['static']:.0%} of it"]
    lines += ["", f"- at {a['clients']} clients: throughput MERGE / static = **{tput:.2f}** (goal ≥ 0.8: {met(tput >= 0.8)}); "
              f"p99 MERGE / static = **{p99:.2f}** (goal ≤ 2: {met(p99 <= 2)}); errors and dropped: "
              f"{met(clean)} (MERGE {a['errors'] or 0}/{a['dropped']}, static {b['errors'] or 0}/{b['dropped']})"]
    if soak_row:
        ok = soak_row["peak_rss"] <= bound + 300
        flat = soak_row["slope_mb_per_min"] <= 5
        lines.append(f"- soak, 128 clients for {args.soak:g} s: {soak_row['rps']:.1f} req/s, p99 "
                     f"{soak_row['p99']:.0f} ms, errors {soak_row['errors'] or 0}, dropped {soak_row['dropped']}; "
                     f"RSS {soak_row['start_rss']:.0f} → peak **{soak_row['peak_rss']:.0f} MB** against the cache "
                     f"bound {bound:.0f} MB + 300 MB ({met(ok)}); slope over the last minute "
                     f"**{soak_row['slope_mb_per_min']:+.1f} MB/min** (no upward trend, ≤ 5 MB/min: {met(flat)})")
    lines.append(f"- fault: kill -9 under 32 clients, restart on the same port: ready again in "
                 f"**{fault_row['ready_s']:.1f} s**, answering in {fault_row['serving_s']:.1f} s; meanwhile the "
                 f"clients got {sum(fault_row['errors'].values())} errors ({fault_row['errors']}) and "
                 f"{fault_row['wrong']} wrong answers out of {fault_row['answered']} (an answer is wrong if it differs "
                 "from the server's earlier answer for the same input)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
