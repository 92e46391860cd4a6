"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServeMetrics:
    """Request count and latency, batch sizes, queue depth, inputs per chain, resident chains."""
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mergetool_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("mergetool_request_latency_seconds", "predict latency, queueing included",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_inputs = Histogram("mergetool_batch_inputs", "inputs per model run", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("mergetool_batch_requests", "requests per model run",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("mergetool_queue_inputs", "inputs waiting for a model run", registry=r)
        self.chain_inputs = Counter("mergetool_chain_inputs", "inputs run per expert chain (named by its tasks)",
                                    ["chain"], registry=r)
        self.truncated = Counter("mergetool_truncated_inputs", "inputs cut to the token limit", registry=r)
        self.rejected = Counter("mergetool_rejected_inputs", "inputs refused by backpressure", ["reason"],
                                registry=r)
        self.resident_chains = Gauge("mergetool_resident_chains", "assembled chains held in memory", registry=r)
        self.resident_bytes = Gauge("mergetool_resident_bytes", "bytes of the resident chains and router",
                                    registry=r)

    def record_run(self, outputs: list[dict], requests: int, chain_names: dict[str, str]) -> None:
        """One model run: its inputs and requests, each input's chain, the truncated ones."""
        self.batch_inputs.observe(len(outputs))
        self.batch_requests.observe(requests)
        for o in outputs:
            self.chain_inputs.labels(chain_names[o["task"]]).inc()
            if o.get("truncated"):
                self.truncated.inc()

    def record_resident(self, chains: int, nbytes: int) -> None:
        self.resident_chains.set(chains)
        self.resident_bytes.set(nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
