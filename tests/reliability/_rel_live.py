"""A live server on the tiny model for the fuzz and resource tests, plus the HTTP helpers they share."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import httpx

from _rel_tiny import tiny_loaded

# The API tests' LiveServer (real uvicorn in a thread), reused rather than copied; its folder is on the
# path only when pytest collected those tests first, so put it there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service" / "api"))
from _server import LiveServer  # noqa: E402
from service.app import create_app
from service.settings import Settings

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
T = 60


def settings(store: Path, **kw) -> Settings:
    """Small limits, so every limit is cheap to reach and every generation takes milliseconds."""
    base = dict(adapter_dir=str(store), dtype="float32", max_batch_size=4, max_seq_len=64, max_prompt_tokens=32,
                max_tokens_limit=8, default_max_tokens=4, max_waiting=16)
    return Settings(**{**base, **kw})


@contextlib.contextmanager
def live_server(store: Path, **kw):
    with LiveServer(create_app(settings(store, **kw), tiny_loaded())) as live:
        live.store = Path(store)
        yield live


def upload(url: str, name: str, config: bytes, weights: bytes, weights_name: str = WEIGHTS) -> httpx.Response:
    return httpx.post(f"{url}/admin/adapters", data={"name": name}, files={CONFIG: config, weights_name: weights},
                      timeout=T)


def upload_folder(url: str, name: str, folder: Path) -> httpx.Response:
    return upload(url, name, (folder / CONFIG).read_bytes(), (folder / WEIGHTS).read_bytes())


STORED_FIELDS = ("name", "kind", "rank", "alpha", "targets", "size", "sha256", "source", "created_at", "served",
                 "pinned")


def listing(url: str) -> list[dict]:
    """What the registry holds, without the usage counters and tiers that serving a request moves."""
    r = httpx.get(f"{url}/admin/adapters", timeout=T)
    assert r.status_code == 200, r.text
    return [{k: a[k] for k in STORED_FIELDS} for a in r.json()["adapters"]]


def still_serving(url: str, model: str) -> None:
    """The server is alive and answers a normal request."""
    assert httpx.get(f"{url}/health", timeout=T).status_code == 200
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 2,
                                                  "temperature": 0}, timeout=T)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
