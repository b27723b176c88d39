"""Two replicas (two real servers) sharing one adapter store, each named in `X-Replica`: an upload to one is
unknown to the other until `POST /admin/rescan`, after which both serve it with the same greedy output; a
delete on one is followed by the other at its next rescan; with `store_rescan_seconds` set, each follows the other by itself
(an upload, then a deactivation)."""
from __future__ import annotations

import socket
import time

import httpx
import pytest

from _rel_live import T, live_server, upload_folder
from _rel_tiny import make_adapter

pytestmark = pytest.mark.slow


def _complete(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 6,
                                                     "temperature": 0}, timeout=T)


def test_rescan_makes_an_upload_on_one_replica_servable_on_the_other(tmp_path):
    store = tmp_path / "store"
    with live_server(store, replica_name="one") as one, live_server(store) as two:
        assert upload_folder(one.url, "shared", make_adapter(tmp_path / "src", seed=4)).status_code == 201
        assert _complete(two.url, "shared").status_code == 404
        r = httpx.post(f"{two.url}/admin/rescan", timeout=T)
        assert r.status_code == 200 and r.json()["added"] == ["shared"], r.text
        on_one, on_two = _complete(one.url, "shared"), _complete(two.url, "shared")
        assert on_one.status_code == on_two.status_code == 200, on_two.text
        # X-Replica names the replica: the configured name, else the host's (a pod's name in Kubernetes)
        assert (on_one.headers["x-replica"], on_two.headers["x-replica"]) == ("one", socket.gethostname())
        assert httpx.get(f"{one.url}/nope", timeout=T).headers["x-replica"] == "one"      # errors too
        assert on_one.json()["choices"][0]["text"] == on_two.json()["choices"][0]["text"]
        base = _complete(two.url, "tiny-llama").json()["choices"][0]["text"]
        assert on_two.json()["choices"][0]["text"] != base              # the adapter really is applied

        assert httpx.delete(f"{one.url}/admin/adapters/shared", timeout=T).status_code == 200
        r = httpx.post(f"{two.url}/admin/rescan", timeout=T)
        assert r.status_code == 200 and r.json()["removed"] == ["shared"], r.text
        assert _complete(two.url, "shared").status_code == 404


def test_periodic_rescan_follows_the_other_replica_by_itself(tmp_path):
    store = tmp_path / "store"
    with live_server(store, store_rescan_seconds=0.2) as one, live_server(store, store_rescan_seconds=0.2) as two:
        assert upload_folder(one.url, "auto", make_adapter(tmp_path / "src", seed=5)).status_code == 201
        deadline = time.monotonic() + 20
        while _complete(two.url, "auto").status_code == 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _complete(two.url, "auto").status_code == 200
        assert httpx.post(f"{two.url}/admin/adapters/auto/deactivate", timeout=T).status_code == 200
        while _complete(one.url, "auto").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = _complete(one.url, "auto")
        assert refused.status_code == 409 and "deactivated" in refused.json()["error"]["message"]
