"""Resource exhaustion over a real server: the device tier holds at most `max_device_adapters` adapters
(activating one more evicts the least recently used idle one; when every slot is held by a running
request, a request for another adapter waits `adapter_wait_seconds` for one, then gets 429 with Retry-After,
while an activation is answered 200 and loads at its first request), and requests that ask for absurd
resources (huge max_tokens, giant prompts and bodies, chunked bodies without a length, enormous ranks,
adapters over `max_adapter_bytes`) get a 4xx, after which the server is healthy and still serves.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from _rel_live import CONFIG, T, WEIGHTS, listing, live_server, still_serving, upload, upload_folder
from _rel_tiny import make_adapter

pytestmark = pytest.mark.slow

BASE = "tiny-llama"


def tiers(url: str) -> dict[str, str]:
    r = httpx.get(f"{url}/admin/adapters", timeout=T)
    return {a["name"]: a["tier"] for a in r.json()["adapters"]}


def complete(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=T)


def test_device_tier_evicts_the_least_recently_used_and_refuses_when_all_slots_are_busy(tmp_path):
    with live_server(tmp_path / "store", max_device_adapters=2, max_seq_len=4096, max_tokens_limit=4000,
                     adapter_wait_seconds=0.5) as live:
        url = live.url
        for i, name in enumerate("abc"):
            assert upload_folder(url, name, make_adapter(tmp_path / name, seed=i)).status_code == 201
        for name in "ab":
            assert complete(url, name).status_code == 200
        assert complete(url, "a").status_code == 200              # b is now the least recently used
        assert complete(url, "c").status_code == 200
        # a CPU server: the device tier is the RAM, so an adapter leaving it goes back to the store
        assert tiers(url) == {"a": "device", "b": "stored", "c": "device"}
        r = httpx.post(f"{url}/admin/adapters/b/activate", timeout=T)     # activating evicts the LRU idle one: a
        assert r.status_code == 200 and r.json()["tier"] == "device"
        assert tiers(url) == {"a": "stored", "b": "device", "c": "device"}

        # two long streams hold the two device slots (b and c) while a third adapter asks for one
        streams, started = [], threading.Barrier(3, timeout=T)

        def hold(name):
            body = {"model": name, "prompt": "hello", "max_tokens": 4000, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=T) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data:"))      # the lease is held from here on
                streams.append(r)
                started.wait()
                stop.wait(T)

        stop = threading.Event()
        threads = [threading.Thread(target=hold, args=(n,), daemon=True) for n in "bc"]
        for t in threads:
            t.start()
        started.wait()
        try:
            busy = {a["name"]: a["in_use"] for a in httpx.get(f"{url}/admin/adapters", timeout=T).json()["adapters"]}
            assert busy["b"] == 1 and busy["c"] == 1, busy
            r = complete(url, "a")                     # a request: waits for a slot, then back-pressure
            assert r.status_code == 429 and r.headers["retry-after"], r.text
            message = r.json()["error"]["message"]
            assert "max_device_adapters=2" in message and "'a'" in message and "waited 0.5 s" in message, message
            r = httpx.post(f"{url}/admin/adapters/a/activate", timeout=T)       # served; it loads at its first
            assert r.status_code == 200 and r.json()["served"] and r.json()["tier"] == "stored"    # request
            assert tiers(url) == {"a": "stored", "b": "device", "c": "device"}  # no slot taken, nothing moved
        finally:
            stop.set()                                   # the clients go away: their requests are cancelled
            for t in threads:
                t.join(T)
        deadline = time.monotonic() + T
        while (r := complete(url, "a")).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.1)                              # until the cancelled streams have given the slots back
        assert r.status_code == 200, r.text
        still_serving(url, "a")


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    with live_server(root / "store", max_body_bytes=1 << 20, max_adapter_bytes=24 * 1024, max_lora_rank=8,
                     max_prompt_tokens=64, max_tokens_limit=16) as live:
        assert upload_folder(live.url, "ref", make_adapter(root / "ref", seed=1)).status_code == 201
        live.root = root
        yield live


def _chunked(total: int, chunk: int = 64 * 1024):
    """A JSON body sent without Content-Length (chunked): the length check of the headers cannot see it."""
    yield b'{"model": "tiny-llama", "prompt": "'
    for _ in range(total // chunk):
        yield b"a" * chunk
    yield b'", "max_tokens": 2}'


ABSURD = [
    ("max-tokens-1e9", lambda u, x: complete(u, BASE, max_tokens=10**9), 400),
    ("max-tokens-2^70", lambda u, x: complete(u, "ref", max_tokens=2**70), 400),
    ("max-completion-tokens-1e9", lambda u, x: httpx.post(f"{u}/v1/chat/completions", json={
        "model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**9}, timeout=T), 400),
    ("max-new-tokens-1e9", lambda u, x: httpx.post(f"{u}/generate", json={
        "inputs": "hi", "parameters": {"max_new_tokens": 10**9}}, timeout=T), 400),
    ("n-choices-1000", lambda u, x: complete(u, BASE, n=1000), 422),
    ("best-of-1000", lambda u, x: complete(u, BASE, best_of=1000), 422),
    ("prompt-100k-chars", lambda u, x: complete(u, BASE, prompt="word " * 20_000), 400),
    ("prompt-100k-token-ids", lambda u, x: complete(u, BASE, prompt=[1] * 100_000), 400),
    ("chat-1000-messages", lambda u, x: httpx.post(f"{u}/v1/chat/completions", json={
        "model": BASE, "messages": [{"role": "user", "content": "hi"}] * 1000, "max_tokens": 2}, timeout=T), 400),
    ("body-over-max-body-bytes", lambda u, x: httpx.post(f"{u}/v1/completions", content=json.dumps(
        {"model": BASE, "prompt": "a" * (2 << 20)}).encode(), headers={"content-type": "application/json"},
        timeout=T), 413),
    ("chunked-body-over-max-body-bytes", lambda u, x: httpx.post(
        f"{u}/v1/completions", content=_chunked(3 << 20), headers={"content-type": "application/json"},
        timeout=T), 413),
    ("upload-over-max-body-bytes", lambda u, x: upload(u, "big", x["config"], b"\0" * (2 << 20)), 413),
    ("adapter-over-max-adapter-bytes", lambda u, x: upload_folder(u, "wide", x["wide"]), 413),
    ("rank-over-max-lora-rank", lambda u, x: upload_folder(u, "rank16", x["rank16"]), 422),
    ("rank-1e9-in-config", lambda u, x: upload(u, "huge-rank", json.dumps(
        {**json.loads(x["config"]), "r": 10**9}).encode(), x["weights"]), 422),
]


@pytest.fixture(scope="module")
def inputs(limited):
    root = limited.root
    ref = root / "ref"
    return {"config": (ref / CONFIG).read_bytes(), "weights": (ref / WEIGHTS).read_bytes(),
            "wide": make_adapter(root / "wide", seed=2, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj")),
            "rank16": make_adapter(root / "rank16", seed=3, r=16)}


@pytest.mark.parametrize("make,status", [pytest.param(m, s, id=i) for i, m, s in ABSURD])
def test_absurd_requests_are_refused_and_the_server_stays_healthy(limited, inputs, make, status):
    before = listing(limited.url)
    r = make(limited.url, inputs)
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error if r.request.url.path == "/generate" else (error["code"] == status and error["message"])   # TGI's shape
    assert listing(limited.url) == before
    still_serving(limited.url, "ref")
