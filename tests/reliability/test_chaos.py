"""Chaos: sixteen good streams keep their exact greedy text while hostile traffic hits the same server process.

A real `python -m service` (tiny random Llama folder, float32) serves four good LoRA adapters and the base.
Sixteen clients stream their request over and over; meanwhile, in a bounded loop, adapters with NaN and inf
tensors and a NaN `lora_alpha` are uploaded (and requests are sent to them), an adapter whose finite weights
overflow fp32 in the forward pass is uploaded and sampled, 30 MB prompts and 1,000-stop-string requests are
sent, and clients drop their streams after the first chunk. Asserted: every good stream completes with its
reference text (taken alone before the chaos), no 5xx anywhere except the overflowing adapter's own requests,
every hostile request gets a 4xx in the error shape (or, for the overflowing adapter, fails alone), `/health`
answers within 1 s throughout, the running / waiting gauges return to 0 once idle, and the server's RSS after
the run is within 10% of before.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from _load_model_folder import write_tiny_model
from _load_process_server import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from load_test import adapter_files, base_config, write_adapter  # noqa: E402

pytestmark = pytest.mark.slow

GOOD_STREAMS, GOOD_ADAPTERS, CHAOS_ROUNDS, TOKENS = 16, 4, 3, 24
BASE = "chaos-base"
T = 60


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stream(url: str, body: dict, drop_after_first: bool = False) -> tuple[int, str, str]:
    """(status, text, finish_reason) of a streamed completion; the error message as text on a non-200."""
    text, finish = [], ""
    with httpx.Client(timeout=T) as client, client.stream("POST", f"{url}/v1/completions",
                                                          json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.text, ""
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return 200, "".join(text), finish
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 200, json.dumps(chunk["error"]), "error"
            choice = chunk["choices"][0]
            text.append(choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
            if drop_after_first:
                return 200, "", "dropped"
    return 200, "".join(text), finish or "cut without [DONE]"


def bad_adapter(folder: Path, good: Path, how: str) -> dict:
    """Files of an adapter made from `good` with one defect: NaN or inf in a tensor, NaN alpha, or overflow."""
    files = adapter_files(good)
    if how == "nan-alpha":
        files["adapter_config.json"] = files["adapter_config.json"].replace(b'"lora_alpha": 8', b'"lora_alpha": NaN')
        assert b"NaN" in files["adapter_config.json"]
        return files
    tensors = load_file(str(good / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    if how == "nan":
        tensors[key][0, 0] = float("nan")
    elif how == "inf":
        tensors[key][0, 0] = float("inf")
    else:                                       # finite weights whose products overflow fp32 in the forward pass
        for k in tensors:
            tensors[k] = tensors[k] * (1e19 if "lora_A" in k else 1e20)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    files["adapter_model.safetensors"] = (folder / "adapter_model.safetensors").read_bytes()
    return files


def is_error_shape(r: httpx.Response) -> bool:
    try:
        return isinstance(r.json()["error"]["message"], str)
    except (ValueError, KeyError, TypeError):
        return False


def test_good_streams_keep_their_text_under_hostile_traffic(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    config = base_config(str(model))
    settings = dict(model=model, served_model_name=BASE, dtype="float32", max_batch_size=GOOD_STREAMS,
                    max_waiting=64, max_seq_len=256, max_prompt_tokens=128, max_tokens_limit=64)
    with ServerProcess(tmp_path, **settings) as server:
        url, pid = server.url, server.process.pid
        good = [write_adapter(tmp_path / f"good-{i}", config, seed=i) for i in range(GOOD_ADAPTERS)]
        for i, folder in enumerate(good):
            r = httpx.post(f"{url}/admin/adapters", data={"name": f"good-{i}"}, files=adapter_files(folder), timeout=T)
            assert r.status_code == 201, r.text
        models = [f"good-{i}" for i in range(GOOD_ADAPTERS)] + [BASE]
        bodies = [{"model": models[i % len(models)], "prompt": f"stream {i}: the", "max_tokens": TOKENS,
                   "temperature": 0} for i in range(GOOD_STREAMS)]
        references = []
        for body in bodies:                     # each alone, twice: the second also warms every path up
            first, second = stream(url, body), stream(url, body)
            assert first == second and first[0] == 200 and first[2] == "length", first
            references.append(first[1])
        rss_before = rss_mib(pid)

        stop = threading.Event()
        health: list[tuple[int, float]] = []
        good_results: list[tuple[int, tuple]] = []

        def watch_health():
            with httpx.Client(timeout=T) as client:
                while not stop.is_set():
                    start = time.monotonic()
                    status = client.get(f"{url}/health").status_code
                    health.append((status, time.monotonic() - start))
                    time.sleep(0.05)

        def good_client(i: int):
            rounds = 0
            while rounds < 2 or not stop.is_set():
                good_results.append((i, stream(url, bodies[i])))
                rounds += 1

        threads = [threading.Thread(target=watch_health)] + [
            threading.Thread(target=good_client, args=(i,)) for i in range(GOOD_STREAMS)]
        for t in threads:
            t.start()
        hostile: list[tuple[str, int, bool]] = []        # (what, status, error shape)
        overflow: list[tuple[str, int, str]] = []
        dropped: list[tuple] = []
        try:
            for round_ in range(CHAOS_ROUNDS):
                for how in ("nan", "inf", "nan-alpha"):
                    name = f"bad-{how}-{round_}"
                    r = httpx.post(f"{url}/admin/adapters", data={"name": name},
                                   files=bad_adapter(tmp_path / name, good[0], how), timeout=T)
                    hostile.append((f"upload {how}", r.status_code, is_error_shape(r)))
                    r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 4,
                                                                  "temperature": 1.0}, timeout=T)
                    hostile.append((f"sample {how}", r.status_code, is_error_shape(r)))
                name = f"overflow-{round_}"
                r = httpx.post(f"{url}/admin/adapters", data={"name": name},
                               files=bad_adapter(tmp_path / name, good[1], "overflow"), timeout=T)
                if r.status_code == 201:        # accepted (finite weights): its requests must fail alone
                    for temperature in (0.0, 1.0):
                        body = {"model": name, "prompt": "x", "max_tokens": 4, "temperature": temperature}
                        s = stream(url, body)
                        overflow.append(("stream", s[0], s[2]))
                        r2 = httpx.post(f"{url}/v1/completions", json=body, timeout=T)
                        finish = r2.json()["choices"][0]["finish_reason"] if r2.status_code == 200 else ""
                        overflow.append(("plain", r2.status_code, finish))
                    assert httpx.delete(f"{url}/admin/adapters/{name}", timeout=T).status_code == 200
                else:
                    hostile.append(("upload overflow", r.status_code, is_error_shape(r)))
                r = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "a" * (30 * 2**20),
                                                              "max_tokens": 4}, timeout=T)
                hostile.append(("30 MB prompt", r.status_code, is_error_shape(r)))
                r = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 4,
                                                              "stop": [f"stop-{k}" for k in range(1000)]}, timeout=T)
                hostile.append(("1000 stop strings", r.status_code, is_error_shape(r)))
                for i in range(4):
                    dropped.append(stream(url, {**bodies[i], "max_tokens": 64}, drop_after_first=True))
        finally:
            stop.set()
            for t in threads:
                t.join(120)

        for what, status, shaped in hostile:
            assert 400 <= status < 500 and shaped, f"{what}: {status} (error shape: {shaped})"
        assert all(d[0] == 200 and d[2] == "dropped" for d in dropped), dropped
        for what, status, finish in overflow:   # failing alone: an error status or finish_reason "error"
            assert status >= 500 or finish == "error", f"overflowing adapter, {what}: {status} {finish}"
        assert len(good_results) >= 2 * GOOD_STREAMS
        for i, (status, text, finish) in good_results:
            assert status == 200 and finish == "length", f"good stream {i}: {status} {finish} {text[:200]}"
            assert text == references[i], f"good stream {i} changed its text under chaos"
        assert health and all(status == 200 for status, _ in health)
        slowest = max(seconds for _, seconds in health)
        assert slowest < 1.0, f"/health took {slowest:.2f} s during the chaos"

        deadline = time.monotonic() + 5               # idle: the gauges come back to zero
        while True:
            metrics = httpx.get(f"{url}/metrics", timeout=T).text
            gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith(("adapter_serve_requests_running ", "adapter_serve_requests_waiting "))}
            if set(gauges.values()) == {0.0} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert gauges and set(gauges.values()) == {0.0}, gauges
        rss_after = rss_mib(pid)
        print(f"\nchaos: {len(good_results)} good streams equal to their reference; {len(hostile)} hostile "
              f"requests, all 4xx; {len(overflow)} overflowing-adapter requests failed alone; {len(dropped)} "
              f"dropped streams; /health {len(health)} probes, slowest {slowest * 1e3:.0f} ms; "
              f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
        assert rss_after <= 1.10 * rss_before, f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
