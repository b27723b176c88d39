"""What the service exposes and how long it waits, over real HTTP: `/metrics` behind the metrics key (or the
admin key once keys are configured), the docs routes switched off by `docs=false`, the API key checked from
the headers before a byte of the body is read, a slow-loris body answered 408 with the connection closed
after `body_timeout`, and a config key with a newline unable to forge a line in the server's log (a real
`python -m service` process, its own log output read back). Each failed before its fix (RELIABILITY.md,
"Hostile input, round 2 — HTTP edge").
"""
from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from _rel_live import CONFIG, WEIGHTS, T, live_server
from _rel_tiny import make_adapter

pytestmark = pytest.mark.slow

ADMIN, INFER, METRICS = "admin-key", "infer-key", "metrics-key"


def get(url: str, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers={"authorization": f"Bearer {key}"} if key else {}, timeout=T)


def test_metrics_need_the_metrics_key_when_one_is_set(tmp_path):
    with live_server(tmp_path / "store", metrics_key=METRICS) as live:
        assert get(live.url, "/metrics").status_code == 401
        assert get(live.url, "/metrics", "wrong").status_code == 401
        r = get(live.url, "/metrics", METRICS)
        assert r.status_code == 200 and "adapter_serve_requests_total" in r.text
        assert get(live.url, "/health").status_code == 200 and get(live.url, "/ready").status_code == 200


def test_metrics_need_the_admin_key_when_keys_are_set_without_a_metrics_key(tmp_path):
    with live_server(tmp_path / "store", api_keys=[INFER], admin_key=ADMIN) as live:
        assert get(live.url, "/metrics").status_code == 401
        r = get(live.url, "/metrics", INFER)
        assert r.status_code == 403 and "METRICS_KEY" in r.json()["error"]["message"]
        assert get(live.url, "/metrics", ADMIN).status_code == 200
    with live_server(tmp_path / "open") as live:                    # no keys at all: open, as before
        assert get(live.url, "/metrics").status_code == 200


def test_docs_routes_can_be_switched_off(tmp_path):
    with live_server(tmp_path / "store", docs=False) as live:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert get(live.url, path).status_code == 404, path
        assert get(live.url, "/health").status_code == 200
    with live_server(tmp_path / "on") as live:
        assert get(live.url, "/openapi.json").status_code == 200


def raw_request(port: int, head: str, body: bytes = b"", wait: float = 10) -> tuple[bytes, float, bool]:
    """Send a request's head (and `body`) on a raw socket, then read until the server closes or `wait` runs
    out: (what came back, seconds until its first byte, whether the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        t0 = time.monotonic()
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data, first, closed = b"", None, False
        deadline = t0 + wait
        while time.monotonic() < deadline:
            s.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = s.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            first = first if first is not None else time.monotonic() - t0
            data += chunk
        return data, first if first is not None else float("inf"), closed


def head(path: str, length: int, key: str | None = None) -> str:
    auth = f"Authorization: Bearer {key}\n" if key else ""
    return (f"POST {path} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n{auth}"
            f"Content-Length: {length}\n")


def test_a_slow_loris_body_gets_408_and_the_connection_closes(tmp_path):
    with live_server(tmp_path / "store", body_timeout=1.0) as live:
        data, first, closed = raw_request(live.port, head("/v1/completions", 1_000_000), b"{", wait=10)
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert 0.9 < first < 4, first
        assert closed and b'"code":408' in data and b"body_timeout" in data
        # a body that arrives in time, in pieces, is served; and a complete body's later reads are not timed
        body = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}).encode()
        data, _, _ = raw_request(live.port, head("/v1/completions", len(body)) + "Connection: close\n",
                                 body, wait=30)
        assert data.startswith(b"HTTP/1.1 200"), data[:300]
        assert httpx.get(f"{live.url}/health", timeout=T).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/admin/adapters", "/generate"])
def test_the_key_is_checked_before_the_body_is_read(tmp_path, path):
    with live_server(tmp_path / "store", api_keys=[INFER], admin_key=ADMIN, body_timeout=30) as live:
        for key in (None, "wrong"):
            data, first, closed = raw_request(live.port, head(path, 1_000_000, key), b"", wait=5)
            assert data.startswith(b"HTTP/1.1 401"), (key, data[:200])
            assert first < 1.0 and closed, (first, closed)
        # a known key gets past the gate, and the route's own check still applies (403 for admin routes)
        body = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}).encode()
        data, _, _ = raw_request(live.port, head("/v1/completions", len(body), INFER) + "Connection: close\n",
                                 body, wait=30)
        assert data.startswith(b"HTTP/1.1 200"), data[:300]
        r = httpx.post(f"{live.url}/admin/adapters/x/activate", headers={"authorization": f"Bearer {INFER}"},
                       timeout=T)
        assert r.status_code == 403


def test_a_config_key_with_a_newline_cannot_forge_a_log_line(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from _load_model_folder import write_tiny_model
    from _load_process_server import ServerProcess

    model = write_tiny_model(tmp_path / "model", hidden=32, layers=2)
    folder = make_adapter(tmp_path / "ref", seed=1)
    with ServerProcess(tmp_path, model=model, dtype="float32", max_seq_len=64) as server:
        config = json.loads((folder / CONFIG).read_bytes())
        config["evil\nFORGED-LINE: admin logged in\r\x1b[2J"] = 1
        files = {CONFIG: json.dumps(config).encode(), WEIGHTS: (folder / WEIGHTS).read_bytes()}
        r = httpx.post(f"{server.url}/admin/adapters", data={"name": "evil"}, files=files, timeout=T)
        r2 = httpx.post(f"{server.url}/v1/completions", json={"model": "no\nFORGED-LINE: 2", "prompt": "x"},
                        timeout=T)
        assert r2.status_code == 404
        time.sleep(0.5)
        output = server.output()
    assert r.status_code in (201, 422), r.text
    assert "FORGED-LINE" in output, output[-2000:]            # the key was logged (as a warning) ...
    assert not [line for line in output.splitlines() if line.lstrip().startswith("FORGED-LINE")], output[-2000:]
    assert "evil\\nFORGED-LINE" in output and "\x1b" not in output          # ... escaped, on its own line
