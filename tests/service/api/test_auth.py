"""API keys through a real server: admin routes need the admin key (401 without a key, 403 with an
inference key); inference keys see and use only the adapters their allow-list names."""
import json

import httpx
import pytest

from _server import LiveServer
from service.app import create_app
from service.model import load_model
from service.settings import Settings

pytestmark = pytest.mark.slow
ADMIN, FULL, LIMITED = "admin-key", "full-key", "limited-key"

ADMIN_ROUTES = [("GET", "/admin/adapters", None), ("GET", "/admin/adapters/a", None),
                ("DELETE", "/admin/adapters/zz", None), ("POST", "/admin/adapters/a/activate", None),
                ("POST", "/admin/adapters/a/deactivate", None), ("POST", "/admin/adapters/a/pin", None),
                ("POST", "/admin/adapters/a/unpin", None), ("POST", "/admin/adapters", None),
                ("PUT", "/admin/adapters/b", {"source": "local", "path": "/nonexistent"}),
                ("POST", "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/nonexistent"}),
                ("POST", "/v1/unload_lora_adapter", {"lora_name": "zz"})]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=2,
                        max_seq_len=256, api_keys=[FULL, LIMITED], admin_key=ADMIN, key_adapters={LIMITED: ["a"]})
    with LiveServer(create_app(settings, load_model(None))) as live:
        yield live


def call(server, method, path, body, key):
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60,
                         content=json.dumps(body) if body is not None else None)


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
def test_admin_routes_need_the_admin_key(server, method, path, body):
    assert call(server, method, path, body, None).status_code == 401
    assert call(server, method, path, body, "wrong").status_code == 401
    assert call(server, method, path, body, FULL).status_code == 403
    assert call(server, method, path, body, ADMIN).status_code not in (401, 403)


def test_inference_needs_a_key_and_allow_lists_hide_adapters(server, tmp_path):
    import torch
    import adapters_core as ac
    from service.model.decoder import Decoder
    loaded = load_model(None)
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict)
    for name in ("a", "b"):
        torch.manual_seed(len(name))
        ac.inject_adapter_in_model(ac.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), model, name)
        ac.save_adapter(model, str(tmp_path / name), name)
        r = call(server, "PUT", f"/admin/adapters/{name}", {"source": "local", "path": str(tmp_path / name)}, ADMIN)
        assert r.status_code == 201, r.text
    assert call(server, "GET", "/v1/models", None, None).status_code == 401
    full = [m["id"] for m in call(server, "GET", "/v1/models", None, FULL).json()["data"]]
    limited = [m["id"] for m in call(server, "GET", "/v1/models", None, LIMITED).json()["data"]]
    assert {"a", "b"} <= set(full) and "a" in limited and "b" not in limited
    body = {"model": "b", "prompt": "Hi", "max_tokens": 2}
    assert call(server, "POST", "/v1/completions", body, LIMITED).status_code == 404
    assert call(server, "POST", "/v1/completions", body, FULL).status_code == 200
    assert call(server, "POST", "/v1/completions", {**body, "model": "a"}, LIMITED).status_code == 200
    gen = {"inputs": "Hi", "parameters": {"adapter_id": "b", "max_new_tokens": 2}}
    assert call(server, "POST", "/generate", gen, LIMITED).status_code == 404


def test_key_checks_and_state_reads_run_on_the_event_loop_not_in_the_thread_pool(server, monkeypatch):
    """The state and key-check dependencies are `async def`: FastAPI hands a plain `def` dependency to its thread
    pool, two hand-offs per request that each waited for the GIL behind the engine and the loader (64 `/tokenize`
    at once 30 % faster without them: BENCHMARKS.md, thirty-eighth session). So are the routes that read the
    registry (a worker thread read it while the event loop changed it). Checked on inference, admin, metrics and
    health routes, with the right key, a wrong one and none; only `/version` (package metadata from disk) and the
    console's files may use the pool."""
    import anyio.to_thread

    handed: list[str] = []
    real = anyio.to_thread.run_sync

    async def recording(func, *args, **kwargs):
        target = getattr(func, "func", func)                  # (a partial)
        target = getattr(func, "keywords", {}).get("function", target)    # (FastAPI's wrapper of a def endpoint)
        handed.append(f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', '?')}")
        return await real(func, *args, **kwargs)
    monkeypatch.setattr(anyio.to_thread, "run_sync", recording)
    assert call(server, "POST", "/tokenize", {"prompt": "hi"}, FULL).status_code == 200
    assert call(server, "POST", "/tokenize", {"prompt": "hi"}, "wrong").status_code == 401
    assert call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, LIMITED).status_code == 200
    assert call(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, None).status_code == 401
    assert call(server, "POST", "/admin/adapters/a/pin", None, FULL).status_code == 403
    assert call(server, "GET", "/metrics", None, ADMIN).status_code == 200
    assert call(server, "GET", "/metrics", None, FULL).status_code == 403
    for path, key, status in (("/v1/models", LIMITED, 200), ("/v1/models/zz", FULL, 404),
                              ("/admin/adapters", ADMIN, 200), ("/admin/adapters/zz", ADMIN, 404),
                              ("/health", None, 200), ("/ready", None, 200), ("/info", None, 200),
                              ("/console/session", FULL, 200)):
        assert call(server, "GET", path, None, key).status_code == status, path
    assert call(server, "GET", "/version", None, None).status_code == 200
    assert [name for name in handed if name.startswith("service.")] == ["service.api.tokens.version"], handed
