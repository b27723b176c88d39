"""Prometheus collectors for the service, in their own registry (`Metrics.registry`), named `adapter_serve_*`.

Per-adapter label values are bounded: the first `max_adapter_labels` adapters that receive traffic keep
their own name as label value, every later one is counted under `"other"`, and the base model is
`"__base__"`, so a thousand adapters never become a thousand series per metric. (A label, once given, is
never taken back: re-ranking by traffic would create new series forever.) The registry calls the
`adapter_*` hooks; the API layer calls `request_*`; the engine's step listener feeds batch metrics.
Beside them, the gauges of the Kubernetes Gateway API Inference Extension's model-server protocol under
vLLM's names (`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:lora_requests_info`), fed by the same engine steps and registry events and also kept in
`gateway_registry` alone, which `/metrics/gateway` serves to the endpoint picker. `recent_errors` keeps the
last failures for the console's live view (`service/recent_errors.py`), and `totals()` sums the counters it
shows.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from service.registry import DEVICE
from service.recent_errors import RecentErrors

BASE_LABEL = "__base__"
OTHER_LABEL = "other"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
APPLY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2.5)


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


class LoraRequestsInfo:
    """`vllm:lora_requests_info`, what the endpoint picker routes adapters by: one series whose labels are
    `max_lora` (device slots), `running_lora_adapters` (the adapters resident on the device tier, idle ones
    included, so affinity routing sees every adapter a replica can serve without a load) and
    `waiting_lora_adapters` (adapters that requests wait on while they load), comma-separated as vLLM writes
    them; its value is the unix time of the last update. The one series is replaced whole at each update (the
    picker reads the newest), so old label sets never pile up and a scrape never sees half an update."""

    NAME = "vllm:lora_requests_info"
    LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")

    def __init__(self):
        self._values: tuple[str, str, str] = ("0", "", "")
        self._time = time.time()

    def set(self, max_lora: int, running: Iterable[str], waiting: Iterable[str]) -> None:
        self._values, self._time = (str(max_lora), ",".join(running), ",".join(waiting)), time.time()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.NAME, "LoRA adapters running (resident on the device) and waiting to load; "
                                 "value: unix time of the last update", labels=self.LABELS)

    def describe(self):
        yield self._family()

    def collect(self):
        family = self._family()
        family.add_metric(list(self._values), self._time)
        yield family


class Metrics:
    def watch_gc(self) -> Callable[[], None]:
        """Time every garbage collection into `gc_pause` (it holds the GIL: the engine's step waits for it);
        returns the function that stops watching."""
        started: dict[int, float] = {}

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[threading.get_ident()] = time.perf_counter()
            elif (begun := started.pop(threading.get_ident(), None)) is not None:
                self.gc_pause.labels(str(info.get("generation", "?"))).observe(time.perf_counter() - begun)
        gc.callbacks.append(on_gc)
        return lambda: gc.callbacks.remove(on_gc) if on_gc in gc.callbacks else None

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
        self.step_seconds = Histogram("adapter_serve_step_seconds", "Engine step duration (decode: one token per "
                                      "sequence; prefill: with prompt tokens)", ["kind"],
                                      buckets=STEP_BUCKETS, registry=r)
        self.kv_cache_usage = Gauge("adapter_serve_kv_cache_usage_ratio", "Share of KV cache slots in use",
                                    registry=r)
        self._step_kinds = {True: self.step_seconds.labels("decode"), False: self.step_seconds.labels("prefill")}
        self._last_gauges: Optional[tuple] = None          # (running, waiting, cache usage) last set
        self._slot_waiters: Callable[[], int] = lambda: 0   # requests waiting for a device slot (registry)
        self._slot_waiting_adapters: Callable[[], Iterable[str]] = tuple      # the adapters they wait for
        self.adapters = Gauge("adapter_serve_adapters", "Registered adapters per tier", ["tier"], registry=r)
        self.adapter_load = Histogram("adapter_serve_adapter_load_seconds", "Time to bring an adapter to the device",
                                      ["from_tier"], buckets=LOAD_BUCKETS, registry=r)
        self.adapter_load_queue = Histogram("adapter_serve_adapter_load_queue_seconds", "Time an adapter load "
                                            "waited for the loader thread (behind the loads before it)",
                                            buckets=LOAD_BUCKETS, registry=r)
        self.adapter_load_read = Histogram("adapter_serve_adapter_load_read_seconds", "Loader-thread part of an "
                                           "adapter load (read, checked and prepared)", buckets=APPLY_BUCKETS,
                                           registry=r)
        self.adapter_load_resume = Histogram("adapter_serve_adapter_load_resume_seconds", "Time a load's "
                                             "finished read waited for the event loop to take it back",
                                             buckets=LOAD_BUCKETS, registry=r)
        self.adapter_apply = Histogram("adapter_serve_adapter_load_apply_seconds",
                                       "Engine-thread part of an adapter load (between two steps: evictions and "
                                       "the injection)", buckets=APPLY_BUCKETS, registry=r)
        self.adapter_bytes = Gauge("adapter_serve_adapter_bytes", "Weight bytes of the adapters per tier (stored: "
                                   "the files; cpu, device: in memory, in adapter_dtype)",
                                   ["tier"], registry=r)
        self.adapter_load_failures = Counter("adapter_serve_adapter_load_failures", "Adapter loads that failed "
                                             "(unreadable, invalid, refused by the model; a wait for a device "
                                             "slot is not one)", registry=r)
        self.evictions = Counter("adapter_serve_adapter_evictions", "Adapters moved down a tier",
                                 ["from_tier"], registry=r)
        self.yields = Counter("adapter_serve_adapter_yields", "Adapters that gave their device slot to requests "
                              "that waited adapter_turn_seconds for one", registry=r)
        self.gc_pause = Histogram("adapter_serve_gc_pause_seconds", "Python garbage collections (every thread "
                                  "waits for one)", ["generation"], buckets=APPLY_BUCKETS, registry=r)
        self.uploads = Counter("adapter_serve_adapter_uploads", "Adapters registered", registry=r)
        self.deletes = Counter("adapter_serve_adapter_deletes", "Adapters deleted", registry=r)
        # The Gateway API Inference Extension's model-server protocol, with vLLM's names and meanings.
        g = self.gateway_registry = CollectorRegistry()
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests queued for a batch slot", registry=None)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the running batch", registry=None)
        self.vllm_kv_cache = Gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0 to 1", registry=None)
        self.lora_info = LoraRequestsInfo()
        self.model_info = Gauge("adapter_serve_model_info", "The base model served (always 1): its id, the form "
                                "of its weights (WEIGHT_FORMAT resolved), the compute dtype and the device",
                                ["model", "weight_format", "dtype", "device"], registry=r)
        for collector in (self.vllm_waiting, self.vllm_running, self.vllm_kv_cache, self.lora_info):
            r.register(collector)
            g.register(collector)
        self._max_lora = 0
        self._records: Optional[Callable[[], Iterable[Any]]] = None
        self.recent_errors = RecentErrors()
        self.tokens_streamed = 0                # generated tokens as they are produced (the counters count at the end)

    # ----- registry hooks (AdapterRegistry(events=metrics)) -------------------------------------------------
    def watch_adapters(self, max_lora: int, records: Callable[[], Iterable[Any]]) -> None:
        """Where `vllm:lora_requests_info` comes from: the device slots and a callable listing the registry's
        records (`AdapterRegistry.list`). Call `refresh_adapters` on the registry's event loop only."""
        self._max_lora, self._records = max_lora, records
        self.refresh_adapters()

    def watch_slot_waiters(self, waiting: Callable[[], int], adapters: Callable[[], Iterable[str]] = tuple) -> None:
        """Where the requests waiting for a device slot are counted from (`AdapterRegistry.slot_waiters`): the
        waiting gauges (`adapter_serve_requests_waiting`, `vllm:num_requests_waiting`) include them, and the
        adapters they wait for (`AdapterRegistry.slot_waiting_adapters`) are waiting adapters."""
        self._slot_waiters, self._slot_waiting_adapters = waiting, adapters

    def slot_waiters_changed(self) -> None:
        self.refresh_adapters()

    def refresh_adapters(self) -> None:
        """Recompute `vllm:lora_requests_info`: resident adapters run; adapters with leases not yet on the
        device (their requests wait for the load) and those requests wait a device slot for wait."""
        if self._records is None:
            return
        running, waiting = [], []
        for record in self._records():
            if record.tier == DEVICE:
                running.append(record.name)
            elif record.in_use:
                waiting.append(record.name)
        waiting += [name for name in self._slot_waiting_adapters() if name not in waiting and name not in running]
        self.lora_info.set(self._max_lora, running, waiting)

    def model_served(self, model: str, weight_format: str, dtype: str, device: str) -> None:
        self.model_info.labels(model, weight_format, dtype, device).set(1)

    def adapter_loaded(self, name: str, seconds: float, from_tier: str) -> None:
        self.adapter_load.labels(from_tier).observe(seconds)
        self.refresh_adapters()

    def adapter_applied(self, name: str, seconds: float) -> None:
        self.adapter_apply.observe(seconds)

    def adapter_read(self, name: str, queued: float, seconds: float, resumed: float) -> None:
        self.adapter_load_queue.observe(queued)
        self.adapter_load_read.observe(seconds)
        self.adapter_load_resume.observe(resumed)

    def adapter_evicted(self, name: str, from_tier: str) -> None:
        self.evictions.labels(from_tier).inc()
        self.refresh_adapters()

    def adapter_yielded(self, name: str) -> None:
        self.yields.inc()

    def adapter_uploaded(self, name: str) -> None:
        self.uploads.inc()

    def adapter_deleted(self, name: str) -> None:
        self.deletes.inc()
        self.refresh_adapters()

    def adapter_load_failed(self, name: str) -> None:
        self.adapter_load_failures.inc()

    def set_tiers(self, counts: dict[str, int], sizes: Optional[dict[str, int]] = None) -> None:
        for tier, count in counts.items():
            self.adapters.labels(tier).set(count)
        for tier, size in (sizes or {}).items():
            self.adapter_bytes.labels(tier).set(size)

    # ----- engine and requests ------------------------------------------------------------------------------
    def engine_step(self, sequences: int, tokens: int, running: int, waiting: int, cache_usage: float,
                    seconds: float = 0.0) -> None:
        """After every engine step, and with `sequences` 0 after a step that only cancelled requests and on
        the engine's idle tick: the gauges then settle (to 0 on an idle server) without a step running."""
        if sequences:
            self.batch_size.observe(sequences)
            self.batch_tokens.inc(tokens)
            self._step_kinds[tokens == sequences].observe(seconds)
        waiting += self._slot_waiters()   # those waiting for their adapter's device slot wait for the batch too
        gauges = (running, waiting, cache_usage)
        if gauges != self._last_gauges:   # six locked sets, ~15 us a step cold, for values that seldom move
            self._last_gauges = gauges
            for gauge, value in ((self.running, running), (self.waiting, waiting),
                                 (self.kv_cache_usage, cache_usage), (self.vllm_running, running),
                                 (self.vllm_waiting, waiting), (self.vllm_kv_cache, cache_usage)):
                gauge.set(value)

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

    def token_generated(self) -> None:
        """One generated token reached its request's stream (event loop thread): the live view's tokens/s,
        which must move during a long generation, not only when it ends."""
        self.tokens_streamed += 1

    def generation_failed(self, adapter: str | None, message: str) -> None:
        """A request failed inside the engine after its response had started (its stream ends with an error)."""
        self.recent_errors.add(None, f"{adapter or BASE_LABEL}: {message}")

    def totals(self) -> dict[str, Any]:
        """Running totals the console turns into rates between two reads: tokens generated so far (counted as
        they stream), tokens computed by engine steps (prompt chunks and decode rows, counted per step), and
        requests finished by outcome with their prompt tokens (counted when each request ends)."""
        outcomes: dict[str, float] = {}
        for sample in _samples(self.requests, "_total"):
            outcomes[sample.labels["outcome"]] = outcomes.get(sample.labels["outcome"], 0) + sample.value
        return {"generated_tokens": self.tokens_streamed,
                "computed_tokens": sum(s.value for s in _samples(self.batch_tokens, "_total")),
                "prompt_tokens": sum(s.value for s in _samples(self.prompt_tokens, "_total")),
                "requests": outcomes}


def _samples(counter: Counter, suffix: str):
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample
