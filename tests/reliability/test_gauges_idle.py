"""The running / waiting / KV-use gauges return to 0 within about a second after clients drop their
streams on an otherwise idle server (round 2, finding 8), over real HTTP.

Eight long streaming requests fill a batch of four and a queue of four; once `/metrics` shows 4 / 4 / 1.0
every client closes its connection at once. The engine handles all the cancellations in one step that has
nothing left to run, so the gauges are only right if such a step (or the engine's idle tick) reports them.
"""
from __future__ import annotations

import json
import socket
import time

import httpx

from _rel_live import T, live_server

GAUGES = ("adapter_serve_requests_running", "adapter_serve_requests_waiting", "adapter_serve_kv_cache_usage_ratio")


def gauges(url: str) -> tuple[float, ...]:
    lines = httpx.get(f"{url}/metrics", timeout=T).text.splitlines()
    values = dict(line.split(" ", 1) for line in lines if line.split(" ", 1)[0] in GAUGES)
    return tuple(float(values[g]) for g in GAUGES)


def open_stream(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(url: str, wanted: tuple, timeout: float) -> float:
    start = time.monotonic()
    while (seen := gauges(url)) != wanted:
        assert time.monotonic() - start < timeout, f"gauges {seen}, wanted {wanted}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_gauges_return_to_zero_after_streams_are_dropped(tmp_path):
    with live_server(tmp_path / "store", max_batch_size=4, max_seq_len=4096, max_tokens_limit=4000) as live:
        model = httpx.get(f"{live.url}/v1/models", timeout=T).json()["data"][0]["id"]
        body = {"model": model, "prompt": "a long story", "max_tokens": 4000, "stream": True, "ignore_eos": True,
                "temperature": 0}
        socks = [open_stream(live.port, body) for _ in range(8)]
        wait_for(live.url, (4.0, 4.0, 1.0), 30)
        for sock in socks:
            sock.close()
        took = wait_for(live.url, (0.0, 0.0, 0.0), 3)
        assert took < 1.5, took
        time.sleep(0.6)                                 # and they stay there (idle ticks report the same)
        assert gauges(live.url) == (0.0, 0.0, 0.0)
