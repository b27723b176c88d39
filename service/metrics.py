"""Prometheus collectors for the service, in their own registry (`Metrics.registry`), named `adapter_serve_*`.

Per-adapter label values are bounded: the first `max_adapter_labels` adapters that receive traffic keep
their own name as label value, every later one is counted under `"other"`, and the base model is
`"__base__"`, so a thousand adapters never become a thousand series per metric. (A label, once given, is
never taken back: re-ranking by traffic would create new series forever.) The registry calls the
`adapter_*` hooks; the API layer calls `request_*`; the engine's step listener feeds batch metrics.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BASE_LABEL = "__base__"
OTHER_LABEL = "other"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class AdapterLabels:
    """Maps adapter names to bounded label values (thread-safe)."""

    def __init__(self, max_labels: int):
        self.max_labels = max_labels
        self._given: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str | None) -> str:
        if name in (None, BASE_LABEL):
            return BASE_LABEL
        with self._lock:
            if name in self._given:
                return name
            if len(self._given) < self.max_labels:
                self._given.add(name)
                return name
        return OTHER_LABEL


class Metrics:
    def __init__(self, max_adapter_labels: int = 20):
        r = self.registry = CollectorRegistry()
        self.label = AdapterLabels(max_adapter_labels)
        self.requests = Counter("adapter_serve_requests", "Finished requests by adapter and outcome",
                                ["adapter", "outcome"], registry=r)
        self.ttft = Histogram("adapter_serve_time_to_first_token_seconds", "Time to first token", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("adapter_serve_inter_token_latency_seconds", "Time between generated tokens",
                             ["adapter"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("adapter_serve_request_latency_seconds", "Request latency, arrival to last token",
                             ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("adapter_serve_prompt_tokens", "Prompt tokens processed", ["adapter"],
                                     registry=r)
        self.generated_tokens = Counter("adapter_serve_generated_tokens", "Tokens generated", ["adapter"],
                                        registry=r)
        self.running = Gauge("adapter_serve_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("adapter_serve_requests_waiting", "Requests queued for a batch slot", registry=r)
        self.batch_size = Histogram("adapter_serve_batch_size", "Sequences per engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_tokens = Counter("adapter_serve_batch_tokens", "Tokens computed by engine steps", registry=r)
        self.kv_cache_usage = Gauge("adapter_serve_kv_cache_usage_ratio", "Share of KV cache slots in use",
                                    registry=r)
        self.adapters = Gauge("adapter_serve_adapters", "Registered adapters per tier", ["tier"], registry=r)
        self.adapter_load = Histogram("adapter_serve_adapter_load_seconds", "Time to bring an adapter to the device",
                                      ["from_tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load_failures = Counter("adapter_serve_adapter_load_failures", "Adapter loads that failed",
                                             registry=r)
        self.evictions = Counter("adapter_serve_adapter_evictions", "Adapters moved down a tier",
                                 ["from_tier"], registry=r)
        self.uploads = Counter("adapter_serve_adapter_uploads", "Adapters registered", registry=r)
        self.deletes = Counter("adapter_serve_adapter_deletes", "Adapters deleted", registry=r)

    # ----- registry hooks (AdapterRegistry(events=metrics)) -------------------------------------------------
    def adapter_loaded(self, name: str, seconds: float, from_tier: str) -> None:
        self.adapter_load.labels(from_tier).observe(seconds)

    def adapter_evicted(self, name: str, from_tier: str) -> None:
        self.evictions.labels(from_tier).inc()

    def adapter_uploaded(self, name: str) -> None:
        self.uploads.inc()

    def adapter_deleted(self, name: str) -> None:
        self.deletes.inc()

    def adapter_load_failed(self, name: str) -> None:
        self.adapter_load_failures.inc()

    def set_tiers(self, counts: dict[str, int]) -> None:
        for tier, count in counts.items():
            self.adapters.labels(tier).set(count)

    # ----- engine and requests ------------------------------------------------------------------------------
    def engine_step(self, sequences: int, tokens: int, running: int, waiting: int, cache_usage: float) -> None:
        """After every engine step, and with `sequences` 0 after a step that only cancelled requests and on
        the engine's idle tick: the gauges then settle (to 0 on an idle server) without a step running."""
        if sequences:
            self.batch_size.observe(sequences)
            self.batch_tokens.inc(tokens)
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_cache_usage.set(cache_usage)

    def request_finished(self, adapter: str | None, outcome: str, prompt_tokens: int, token_times: list[float],
                         arrival: float, end: float) -> None:
        label = self.label(adapter)
        self.requests.labels(label, outcome).inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.generated_tokens.labels(label).inc(len(token_times))
        if token_times:
            self.ttft.labels(label).observe(token_times[0] - arrival)
            for a, b in zip(token_times, token_times[1:]):
                self.itl.labels(label).observe(b - a)
        self.e2e.labels(label).observe(end - arrival)

    def request_rejected(self, adapter: str | None, outcome: str) -> None:
        self.requests.labels(self.label(adapter), outcome).inc()
