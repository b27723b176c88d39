"""Metrics: per-adapter label values stay bounded however many adapters serve traffic; the Gateway API
Inference Extension's gauges carry vLLM's names, and `vllm:lora_requests_info` is one series listing the
adapters resident on the device as running."""
import time
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import BASE_LABEL, OTHER_LABEL, Metrics
from service.registry import DEVICE


def test_label_cardinality_is_bounded_with_200_adapters():
    m = Metrics(max_adapter_labels=20)
    for i in range(200):
        m.request_finished(f"adapter-{i}", "success", 5, [1.0, 1.1, 1.2], 0.9, 1.3)
    m.request_finished(None, "success", 5, [1.0], 0.9, 1.1)
    text = generate_latest(m.registry).decode()
    labels = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("adapter_serve_requests_total{")}
    assert len(labels) == 22                       # 20 named + "other" + the base model
    assert OTHER_LABEL in labels and BASE_LABEL in labels and "adapter-0" in labels and "adapter-150" not in labels
    other = [line for line in text.splitlines()
             if line.startswith(f'adapter_serve_requests_total{{adapter="{OTHER_LABEL}"')]
    assert other and float(other[0].split()[-1]) == 180.0


def _families(registry) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_gateway_gauges_have_vllm_names_and_one_lora_series():
    m = Metrics()
    records = [SimpleNamespace(name="a", tier=DEVICE, in_use=0), SimpleNamespace(name="b", tier=DEVICE, in_use=2),
               SimpleNamespace(name="c", tier="cpu", in_use=1), SimpleNamespace(name="d", tier="stored", in_use=0)]
    m.watch_adapters(4, lambda: records)
    m.engine_step(3, 40, running=3, waiting=5, cache_usage=0.25)
    gateway = _families(m.gateway_registry)
    assert set(gateway) == {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                            "vllm:lora_requests_info"}
    assert {name: gateway[name].samples[0].value for name in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                                                              "vllm:kv_cache_usage_perc")} == {
        "vllm:num_requests_waiting": 5, "vllm:num_requests_running": 3, "vllm:kv_cache_usage_perc": 0.25}
    (sample,) = gateway["vllm:lora_requests_info"].samples
    # idle resident adapters are running (affinity routing must see them); a leased one not yet loaded waits
    assert sample.labels == {"max_lora": "4", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"}
    assert abs(sample.value - time.time()) < 60
    records[2].tier = DEVICE                         # its load finished: the registry's event refreshes the series
    m.adapter_loaded("c", 0.1, "cpu")
    (sample,) = _families(m.gateway_registry)["vllm:lora_requests_info"].samples
    assert sample.labels["running_lora_adapters"] == "a,b,c" and sample.labels["waiting_lora_adapters"] == ""
    # the full registry has them too, beside our own families
    everything = _families(m.registry)
    assert set(gateway) <= set(everything) and "adapter_serve_requests_running" in everything


def test_garbage_collections_are_timed_while_watched():
    import gc
    m = Metrics()

    def count() -> float:
        text = generate_latest(m.registry).decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("adapter_serve_gc_pause_seconds_count"))
    unwatch = m.watch_gc()
    try:
        gc.collect()
        gc.collect(0)
        assert count() >= 2
        assert 'adapter_serve_gc_pause_seconds_count{generation="2"}' in generate_latest(m.registry).decode()
    finally:
        unwatch()
    seen = count()
    gc.collect()
    assert count() == seen, "no longer timed once unwatched"


def test_steps_are_timed_by_kind():
    m = Metrics()
    m.engine_step(3, 40, running=3, waiting=5, cache_usage=0.25, seconds=0.3)      # prompt tokens in it
    m.engine_step(3, 3, running=3, waiting=5, cache_usage=0.25, seconds=0.05)      # one token per sequence
    m.engine_step(0, 0, running=0, waiting=0, cache_usage=0.0)                     # an idle tick: not a step
    samples = {(s.name, s.labels.get("kind")): s.value for s in _families(m.registry)["adapter_serve_step_seconds"].samples}
    assert samples[("adapter_serve_step_seconds_count", "prefill")] == 1
    assert samples[("adapter_serve_step_seconds_count", "decode")] == 1
    assert abs(samples[("adapter_serve_step_seconds_sum", "decode")] - 0.05) < 1e-9


def test_a_loads_wait_for_the_loader_its_read_and_its_wait_for_the_loop_are_timed_apart():
    m = Metrics()
    m.adapter_read("a", 0.04, 0.003, 0.03)
    m.adapter_read("b", 0.0, 0.002, 0.0)
    families = _families(m.registry)
    queue = {s.name: s.value for s in families["adapter_serve_adapter_load_queue_seconds"].samples}
    read = {s.name: s.value for s in families["adapter_serve_adapter_load_read_seconds"].samples}
    resume = {s.name: s.value for s in families["adapter_serve_adapter_load_resume_seconds"].samples}
    assert queue["adapter_serve_adapter_load_queue_seconds_count"] == 2
    assert read["adapter_serve_adapter_load_read_seconds_count"] == 2
    assert resume["adapter_serve_adapter_load_resume_seconds_count"] == 2
    assert abs(queue["adapter_serve_adapter_load_queue_seconds_sum"] - 0.04) < 1e-9
    assert abs(read["adapter_serve_adapter_load_read_seconds_sum"] - 0.005) < 1e-9
    assert abs(resume["adapter_serve_adapter_load_resume_seconds_sum"] - 0.03) < 1e-9
