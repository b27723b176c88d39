"""`bench/load_test.py --short` as a user runs it: it starts a real server process on the default model,
uploads its adapters, takes reference outputs, drives concurrent streaming and non-streaming clients over
Zipf-drawn adapters while an admin loop churns other adapters, and must pass every criterion: no 5xx, every
greedy answer equal to its reference, 429 with Retry-After once the queue is full, a bounded queue, RSS after
the run within 10% of RSS after warm-up, and exit 0 on SIGTERM. And the case the long run found: a request
whose adapter cannot get a device slot (all held by requests in flight) waits for one, and past the wait is
refused with 429, not 503."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "load_test.py"


def test_short_load_run_meets_every_criterion(tmp_path):
    out = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--short", "--json", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(out.read_text())
    assert summary["passed"] and all(summary["checks"].values()), summary["checks"]
    assert summary["statuses"].get("200", 0) >= 10
    assert not {s for s in summary["statuses"] if s.startswith("5") or s == "transport error"}
    assert summary["mismatch_count"] == 0 and summary["references"] == 14
    assert summary["distinct_reference_outputs"] > 2          # the adapters really change the outputs
    assert summary["statuses"].get("429", 0) == summary["throttled_with_retry_after"] > 0
    assert summary["max_waiting_seen"] <= 2
    assert summary["rss_after_mib"] <= 1.10 * summary["rss_warm_mib"]
    assert summary["admin"].get("upload 201", 0) >= 1 and summary["admin"].get("delete 200", 0) >= 1
    assert summary["server_exit_status"] == 0


def test_a_request_waits_for_a_device_slot_and_is_served_or_refused_with_429(tmp_path):
    """What the long run met: every device slot held by an adapter of a request in flight. A request for
    another adapter waits for a slot, as vLLM's and LoRAX's schedulers hold it (`adapter_wait_seconds`), and is
    served once the slot frees; when no release can help (the slot's adapter pinned, idle) it is back-pressure
    at once like a full queue (429 with Retry-After), not a server error (the wait's time limit:
    test_resource_limits.py)."""
    import threading
    sys.path.insert(0, str(SCRIPT.parent))
    from load_test import adapter_files, base_config, write_adapter
    from _load_live_server import LiveServer
    from _load_model_folder import write_tiny_model
    from service.app import create_app
    from service.settings import Settings

    model = write_tiny_model(tmp_path / "tiny")
    config = base_config(str(model))
    settings = Settings(model=str(model), adapter_dir=str(tmp_path / "store"), dtype="float32",
                        max_device_adapters=1, max_seq_len=20000, max_tokens_limit=19000, adapter_wait_seconds=3)
    with LiveServer(create_app(settings)) as server:
        for seed, name in enumerate(("held", "other")):
            files = adapter_files(write_adapter(tmp_path / name, config, seed))
            assert httpx.post(f"{server.url}/admin/adapters", data={"name": name}, files=files,
                              timeout=60).status_code == 201
        # (long enough to outlast the waits below on a fast machine; the client's close ends it)
        long = {"model": "held", "prompt": "Hi", "max_tokens": 19000, "temperature": 0, "stream": True}
        short = {"model": "other", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
        answers = []

        def ask():
            started = time.monotonic()
            answers.append((httpx.post(f"{server.url}/v1/completions", json=short, timeout=60),
                            time.monotonic() - started))
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=60) as held:
            lines = held.iter_lines()                   # kept: a dropped iterator would close the stream
            next(lines)                                 # "held" is on the only device slot, in use
            waiter = threading.Thread(target=ask)
            waiter.start()
            time.sleep(0.8)
            assert not answers                          # waiting for the slot, not refused
            stats = httpx.get(f"{server.url}/stats", timeout=60).json()["requests"]
            assert stats["waiting_for_adapter_slot"] == 1 and stats["waiting"] >= 1, stats
            # a streaming client that goes away while its request waits takes its request with it
            gone = {**short, "stream": True}
            with pytest.raises(httpx.ReadTimeout):
                with httpx.stream("POST", f"{server.url}/v1/completions", json=gone,
                                  timeout=httpx.Timeout(60, read=0.5)) as r:
                    r.read()
            for _ in range(40):
                if httpx.get(f"{server.url}/stats", timeout=60).json()["requests"]["waiting_for_adapter_slot"] == 1:
                    break
                time.sleep(0.05)
            assert httpx.get(f"{server.url}/stats", timeout=60).json()["requests"]["waiting_for_adapter_slot"] == 1
        waiter.join(30)                                 # the closed stream's lease is released: served
        served, waited = answers[0]
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 4, served.text
        assert waited >= 0.7
        # the slot held by a pinned adapter no request uses ("other", served last): no release can help, no wait
        assert httpx.post(f"{server.url}/admin/adapters/other/pin", timeout=60).status_code == 200
        started = time.monotonic()
        refused = httpx.post(f"{server.url}/v1/completions", json={**short, "model": "held"}, timeout=60)
        assert refused.status_code == 429 and time.monotonic() - started < 2, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "device slots" in refused.json()["error"]["message"]
