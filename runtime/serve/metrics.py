"""Prometheus metrics for ``GET /metrics``: requests, queue depth, tokens/s, time to first token.

Each server owns its registry (not the process-global one), so several apps in one process
(tests, Ray replicas) never collide.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, window_s: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsvl_requests", "HTTP requests to /v1/chat/completions by status",
                                ["status"], registry=r)
        self.outcomes = Counter("dsvl_generations", "generations by outcome", ["outcome"], registry=r)
        self.waiting = Gauge("dsvl_queue_depth", "requests waiting to be admitted", registry=r)
        self.active = Gauge("dsvl_active_sequences", "sequences in the decode batch", registry=r)
        self.generated = Counter("dsvl_generated_tokens", "tokens generated", registry=r)
        self.rate = Gauge("dsvl_tokens_per_second", f"tokens generated per second over the last "
                          f"{window_s:.0f} s", registry=r)
        self.ttft = Histogram("dsvl_time_to_first_token_seconds", "from request to first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.window_s, self.lock, self.recent = window_s, threading.Lock(), {}
        self.rate.set_function(self._rate)

    def request(self, status: int) -> None:
        self.requests.labels(str(status)).inc()

    def finished(self, outcome: str) -> None:
        self.outcomes.labels(outcome).inc()

    def queue(self, waiting: int, active: int) -> None:
        self.waiting.set(waiting)
        self.active.set(active)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, count: int) -> None:
        self.generated.inc(count)
        second = int(time.monotonic())
        with self.lock:  # per-second counts, pruned as they age: bounded however long it runs
            self.recent[second] = self.recent.get(second, 0) + count
            if len(self.recent) > self.window_s + 2:
                self._prune(second)

    def _prune(self, now: float) -> None:
        self.recent = {t: n for t, n in self.recent.items() if now - t < self.window_s}

    def _rate(self) -> float:
        with self.lock:
            self._prune(time.monotonic())
            return sum(self.recent.values()) / self.window_s

    def render(self) -> bytes:
        return generate_latest(self.registry)
