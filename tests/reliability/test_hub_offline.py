"""A hub registration without a reachable hub fails fast with a clear error (round 2, finding 11b), over
HTTP and without touching the network: the hub endpoint is a local socket that accepts connections and
never answers (what a black-holed route or a dead proxy looks like), a closed local port, or offline mode.
Before, `huggingface_hub`'s client (no timeout of its own) waited on the silent endpoint without end.
"""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from _rel_live import T, listing, live_server
from _rel_tiny import tree

TIMEOUT = 1.0


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A silent hub on loopback (accepts, never answers); the hub client online, with an empty cache."""
    from huggingface_hub import constants
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    yield constants, monkeypatch
    listener.close()
    for conn in held:
        conn.close()


def put_hub(url: str, name: str, revision="main") -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.put(f"{url}/admin/adapters/{name}", json={"source": "hub", "repo_id": "someone/lora",
                                                        "revision": revision}, timeout=T)
    return r, time.monotonic() - start


def test_hub_lookup_without_network_fails_fast(tmp_path, hub):
    constants, monkeypatch = hub
    with live_server(tmp_path / "store", hub_timeout=TIMEOUT) as live:
        before = tree(live.store)
        r, took = put_hub(live.url, "silent")
        assert r.status_code == 503 and took < TIMEOUT + 2, (r.text, took)
        assert "did not answer" in r.json()["error"]["message"] and "someone/lora" in r.json()["error"]["message"]

        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")       # nothing listens: refused
        r, took = put_hub(live.url, "refused")
        assert r.status_code == 503 and took < TIMEOUT + 2, (r.text, took)
        assert "cannot be reached" in r.json()["error"]["message"]

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        r, took = put_hub(live.url, "offline", revision="0123456789abcdef0123456789abcdef01234567")
        assert r.status_code == 404 and took < TIMEOUT + 2, (r.text, took)
        assert "offline" in r.json()["error"]["message"]
        assert listing(live.url) == [] and tree(live.store) == before
        assert httpx.get(f"{live.url}/health", timeout=T).status_code == 200
