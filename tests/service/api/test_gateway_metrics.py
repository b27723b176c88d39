"""The Gateway API Inference Extension's gauges over real HTTP, through a real uvicorn server on the embedded
model: `vllm:num_requests_running` / `_waiting` and `vllm:kv_cache_usage_perc` follow four streams on a
two-slot engine and settle to 0 when they are dropped; `vllm:lora_requests_info` lists the adapters resident
on the device tier (`max_lora` slots, least recently used evicted) whether or not a request is running on
them; `/metrics/gateway` serves only those families, without a key when `gateway_metrics_open` is set, and
with the metrics key otherwise, while `/metrics` keeps needing its key."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_folders import save_random_lora
from _server import LiveServer
from service.app import create_app
from service.model.decoder import Decoder
from service.settings import Settings

pytestmark = pytest.mark.slow

T = 120
KEY = "metrics-secret"
GATEWAY_FAMILIES = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                    "vllm:lora_requests_info"}


@pytest.fixture(scope="module")
def folder(loaded, tmp_path_factory):
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict)
    return save_random_lora(model, tmp_path_factory.mktemp("adapters") / "a", "a", seed=1)


def settings(tmp_path, **kw) -> Settings:
    return Settings(adapter_dir=str(tmp_path / "store"), max_batch_size=2, max_seq_len=256, max_prompt_tokens=64,
                    max_tokens_limit=64, max_device_adapters=2, metrics_key=KEY, **kw)


def upload(url: str, name: str, folder) -> None:
    files = {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    r = httpx.post(f"{url}/admin/adapters", data={"name": name}, files=files, timeout=T)
    assert r.status_code == 201, r.text


def gateway(url: str) -> dict:
    r = httpx.get(f"{url}/metrics/gateway", timeout=T)
    assert r.status_code == 200, r.text
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert set(families) == GATEWAY_FAMILIES
    return families


def value(families: dict, name: str) -> float:
    (sample,) = families[name].samples
    return sample.value


def lora(families: dict) -> dict:
    (sample,) = families["vllm:lora_requests_info"].samples
    assert abs(sample.value - time.time()) < 300
    return sample.labels


def generate(url: str, adapter: str) -> None:
    r = httpx.post(f"{url}/generate", json={"inputs": "Hello", "parameters": {"adapter_id": adapter,
                                                                            "max_new_tokens": 2}}, timeout=T)
    assert r.status_code == 200, r.text


def test_gateway_gauges_follow_streams_and_the_device_tier(loaded, folder, tmp_path):
    with LiveServer(create_app(settings(tmp_path, gateway_metrics_open=True), loaded)) as server:
        url = server.url
        assert httpx.get(f"{url}/metrics", timeout=T).status_code == 401      # the rest still needs the key
        keyed = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=T).text
        assert all(name in keyed for name in GATEWAY_FAMILIES)
        idle = gateway(url)
        assert lora(idle) == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
        for name in ("a1", "a2", "a3"):
            upload(url, name, folder)
        generate(url, "a1")
        assert lora(gateway(url))["running_lora_adapters"] == "a1"      # resident, though its request ended
        generate(url, "a2")
        generate(url, "a3")                                              # two slots: a1, least recent, leaves
        assert sorted(lora(gateway(url))["running_lora_adapters"].split(",")) == ["a2", "a3"]

        # four long streams on two engine slots: two run, two wait; dropped, the gauges settle to 0
        stop = threading.Event()

        def stream():
            body = {"inputs": "Once upon a time", "stream": True,
                    "parameters": {"adapter_id": "a2", "max_new_tokens": 64, "ignore_eos_token": True}}
            with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=T) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        seen, deadline = set(), time.time() + 60
        try:
            while time.time() < deadline:
                now = gateway(url)
                seen.add((value(now, "vllm:num_requests_running"), value(now, "vllm:num_requests_waiting")))
                if (2, 2) in seen and value(now, "vllm:kv_cache_usage_perc") > 0:
                    break
                time.sleep(0.02)
        finally:
            stop.set()
            for t in threads:
                t.join(T)
        assert (2, 2) in seen, seen
        deadline = time.time() + 10
        while time.time() < deadline:
            now = gateway(url)
            if value(now, "vllm:num_requests_running") == value(now, "vllm:num_requests_waiting") == 0:
                break
            time.sleep(0.05)
        assert value(now, "vllm:num_requests_running") == value(now, "vllm:num_requests_waiting") == 0
        assert value(now, "vllm:kv_cache_usage_perc") == 0
        assert "a2" in lora(now)["running_lora_adapters"].split(",")


def test_the_gateway_route_needs_the_metrics_key_unless_opened(loaded, tmp_path):
    with LiveServer(create_app(settings(tmp_path), loaded)) as server:
        assert httpx.get(f"{server.url}/metrics/gateway", timeout=T).status_code == 401
        r = httpx.get(f"{server.url}/metrics/gateway", headers={"Authorization": f"Bearer {KEY}"}, timeout=T)
        assert r.status_code == 200 and "vllm:lora_requests_info{" in r.text
        assert "adapter_serve_" not in r.text
