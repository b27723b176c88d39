"""The console's server side without a browser: the static page and its assets (local only, every referenced
file served, installed as package data), `/console/session` for each kind of key, `/stats` (keys, shape,
live token totals, recent errors carrying the request's id and the message the client got), the pin / unpin
admin routes, and `RecentErrors` itself."""
from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest

from _server import LiveServer
from lora_folders import save_random_lora_of
from service.api.console import ASSETS, STATIC
from service.app import create_app
from service.recent_errors import RecentErrors
from service.settings import Settings

pytestmark = pytest.mark.slow

ADMIN, INFER, LIMITED, METRICS = "c-admin", "c-infer", "c-limited", "c-metrics"
REPO = Path(__file__).resolve().parents[3]
T = 60


@pytest.fixture(scope="module")
def keyed(loaded, tmp_path_factory):
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=2,
                        max_seq_len=128, api_keys=[INFER, LIMITED], admin_key=ADMIN, metrics_key=METRICS,
                        key_adapters={LIMITED: ["x"]})
    with LiveServer(create_app(settings, loaded)) as live:
        yield live


def get(server, path, key=None, **kw):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server.url}{path}", headers=headers, timeout=T, **kw)


def post(server, path, key=ADMIN, headers=None, **kw):
    headers = {"authorization": f"Bearer {key}", **(headers or {})}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=T, **kw)


# ----- the static page -------------------------------------------------------------------------------------------
def test_the_page_and_every_file_it_references_are_served_from_this_origin(keyed):
    page = get(keyed, "/console")                        # no key needed: the page asks for one
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    referenced = set(re.findall(r'(?:href|src)="console/assets/([^"]+)"', page.text))
    for name in list(referenced):
        if name.endswith(".js"):
            referenced |= set(re.findall(r'from "\./([^"]+)"', (STATIC / name).read_text()))
    assert {"main.js", "console.css", "api.js", "adapters.js", "playground.js", "live.js"} <= referenced
    for name in referenced:
        r = get(keyed, f"/console/assets/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "text/css"), name
        assert r.content == (STATIC / name).read_bytes()
    for path in STATIC.iterdir():                        # nothing in the console names another host
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), path.name
    for bad in ("/console/assets/nope.js", "/console/assets/..%2Fapp.py", "/console/assets/%2E%2E%2Fadmin.py"):
        assert get(keyed, bad).status_code == 404, bad


def test_the_console_files_are_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = package_data["service"]
    for name in ASSETS:
        assert any(fnmatch(f"console/{name}", g) for g in globs), name
    assert set(ASSETS) == {p.name for p in STATIC.iterdir() if p.is_file()}


def test_the_console_can_be_turned_off(loaded, tmp_path):
    settings = Settings(adapter_dir=str(tmp_path), dtype="float32", max_batch_size=1, max_seq_len=64, console=False)
    with LiveServer(create_app(settings, loaded)) as live:
        assert get(live, "/console").status_code == 404
        assert get(live, "/console/assets/main.js").status_code == 404
        assert get(live, "/console/session").json()["role"] == "open"


# ----- session ---------------------------------------------------------------------------------------------------
def test_session_says_what_each_key_may_see(keyed):
    admin = get(keyed, "/console/session", ADMIN).json()
    assert (admin["role"], admin["adapters"], admin["metrics"]) == ("admin", None, True)
    assert admin["model"] == get(keyed, "/ready").json()["model"]
    assert get(keyed, "/console/session", INFER).json()["role"] == "inference"
    limited = get(keyed, "/console/session", LIMITED).json()
    assert (limited["role"], limited["adapters"], limited["metrics"]) == ("inference", ["x"], False)
    for key, message in ((None, "missing API key"), ("wrong", "invalid API key"), (METRICS, "only reads metrics")):
        r = get(keyed, "/console/session", key)
        assert r.status_code == 401 and message in r.json()["error"]["message"]


# ----- stats -----------------------------------------------------------------------------------------------------
def test_stats_needs_the_metrics_or_admin_key(keyed):
    assert get(keyed, "/stats").status_code == 401
    assert get(keyed, "/stats", INFER).status_code == 401     # as /metrics: with a metrics key, only it or admin
    assert get(keyed, "/stats", METRICS).status_code == 200
    stats = get(keyed, "/stats", ADMIN).json()
    assert stats["requests"]["running"] == 0 and stats["requests"]["max_running"] == 2
    assert stats["kv_cache"] == {"usage": 0.0, "slots": 2, "free_slots": 2}
    assert set(stats["adapters"]["tiers"]) == {"stored", "cpu", "device"}
    default = {name: field.default for name, field in Settings.model_fields.items()}     # the fixture keeps them
    assert stats["adapters"]["limits"] == {"device": default["max_device_adapters"], "cpu": default["max_cpu_adapters"],
                                           "device_bytes": default["adapter_memory_budget"]}
    assert set(stats["adapters"]["bytes"]) == {"stored", "cpu", "device"}


def test_stats_totals_move_with_generation_and_errors_name_the_request(keyed, loaded, tmp_path):
    before = get(keyed, "/stats", ADMIN).json()
    base = before["model"]
    r = post(keyed, "/v1/completions", INFER, json={"model": base, "prompt": "Hello", "max_tokens": 5,
                                                    "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    after = get(keyed, "/stats", ADMIN).json()
    assert after["totals"]["generated_tokens"] - before["totals"]["generated_tokens"] == 5
    assert after["totals"]["computed_tokens"] > before["totals"]["computed_tokens"]
    assert after["totals"]["requests"]["success"] == before["totals"]["requests"].get("success", 0) + 1

    missing = post(keyed, "/v1/chat/completions", INFER, json={"model": "ghost", "messages": [
        {"role": "user", "content": "hi"}]}, headers={"x-request-id": "console-test-1"})
    assert missing.status_code == 404
    errors = get(keyed, "/stats", ADMIN).json()["errors"]
    newest = errors["recent"][0]
    assert newest["status"] == 404 and newest["path"] == "/v1/chat/completions" and newest["method"] == "POST"
    assert newest["message"] == missing.json()["error"]["message"] and newest["request_id"] == "console-test-1"
    assert errors["total"] >= 1

    # an upload refused with 422 lands there too, with the server's message
    folder = save_random_lora_of(loaded, tmp_path / "x", "x", seed=3, r=4)
    files = {"adapter_config.json": (folder / "adapter_config.json").read_bytes()}
    refused = post(keyed, "/admin/adapters", data={"name": "x"}, files=files)
    assert refused.status_code == 422
    newest = get(keyed, "/stats", ADMIN).json()["errors"]["recent"][0]
    assert (newest["status"], newest["message"]) == (422, refused.json()["error"]["message"])


# ----- pin / unpin -----------------------------------------------------------------------------------------------
def test_pin_and_unpin_are_admin_routes_kept_in_the_store(keyed, loaded, tmp_path):
    folder = save_random_lora_of(loaded, tmp_path / "p", "p", seed=5, r=4)
    r = post(keyed, "/admin/adapters", data={"name": "pinme"},
             files={n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")})
    assert r.status_code == 201, r.text
    assert post(keyed, "/admin/adapters/pinme/pin", INFER).status_code == 403
    assert post(keyed, "/admin/adapters/pinme/pin").json()["pinned"] is True
    assert get(keyed, "/admin/adapters/pinme", ADMIN).json()["pinned"] is True
    assert get(keyed, "/stats", ADMIN).json()["adapters"]["pinned"] == 1
    assert post(keyed, "/admin/adapters/pinme/unpin").json()["pinned"] is False
    assert get(keyed, "/admin/adapters/pinme", ADMIN).json()["pinned"] is False
    assert post(keyed, "/admin/adapters/ghost/pin").status_code == 404


# ----- RecentErrors ----------------------------------------------------------------------------------------------
def test_recent_errors_keep_the_newest_first_and_stay_bounded():
    errors = RecentErrors(max_entries=3)
    for i in range(5):
        errors.add(400 + i, f"m{i}", "POST", "/x", f"id{i}")
    errors.add(None, "generation failed: boom")
    latest = errors.latest()
    assert [e["message"] for e in latest] == ["generation failed: boom", "m4", "m3"]
    assert latest[0]["status"] is None and errors.total == 6
    assert [e["request_id"] for e in errors.latest(2)] == [None, "id4"]
