"""Prometheus metrics of a server (``GET /metrics``) and its structured request log.

Each ``App`` has its own registry (two servers in one process do not mix their counts):
requests by endpoint, model and status, request latency and time-to-first-token histograms,
generated tokens, errors by code, and, read live from each model's batcher, queue depth and
decode slots in use.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

log = logging.getLogger("ftjax.serve.requests")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's counters, histograms and gauges."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ftjax_requests", "HTTP requests answered.",
                                ("endpoint", "model", "status"), registry=r)
        self.errors = Counter("ftjax_errors", "Requests answered with an error, by error code.",
                              ("endpoint", "code"), registry=r)
        self.latency = Histogram("ftjax_request_latency_seconds", "Request latency.",
                                 ("endpoint", "model"), buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("ftjax_time_to_first_token_seconds",
                              "Submission to the first generated token.", ("model",),
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("ftjax_generated_tokens", "Tokens generated.", ("model",), registry=r)
        self.queue = Gauge("ftjax_queue_depth", "Requests waiting for a decode slot.", ("model",),
                           registry=r)
        self.slots = Gauge("ftjax_slots_in_use", "Decode slots (rows) in use.", ("model",),
                           registry=r)
        self.capacity = Gauge("ftjax_slots", "Decode slots (rows) available.", ("model",),
                              registry=r)

    def watch(self, model: str, queue_depth: Callable[[], int], in_use: Callable[[], int],
              capacity: int) -> None:
        """Read a batcher's live queue depth and slot use at every scrape."""
        self.queue.labels(model).set_function(queue_depth)
        self.slots.labels(model).set_function(in_use)
        self.capacity.labels(model).set(capacity)

    def observe(self, record: dict[str, Any]) -> None:
        """Count one answered request (the structured log ``record``) and log it as JSON."""
        endpoint, model, status = record["path"], record.get("model") or "", record["status"]
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(record["latency_s"])
        if status >= 400:
            self.errors.labels(endpoint, record.get("error") or str(status)).inc()
        if record.get("ttft_s") is not None:
            self.ttft.labels(model).observe(record["ttft_s"])
        if record.get("completion_tokens"):
            self.tokens.labels(model).inc(record["completion_tokens"])
        log.info(json.dumps(record))

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
