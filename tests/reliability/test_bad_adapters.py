"""Adapters that are unsound or misnamed never enter the registry, over real HTTP (round 2, findings 2, 9,
11a), and a stored adapter that fails today's checks is quarantined instead of breaking the admin routes.

Refused with 422 naming the field or tensor, nothing stored, listing unchanged: NaN / Infinity in the
config (`lora_alpha`, an `alpha_pattern` value, any other number), a LoRA scaling past the bound
(`lora_alpha` -1e308), NaN or inf tensors. Names: the base model's id (any case) is 409, a route word is
422. An upload with both `.safetensors` and `.bin` fields is 422. A store written before these checks (an
adapter with `"lora_alpha": NaN` on disk) starts up with that adapter listed as quarantined with its error;
list, get, activate, deactivate and inference answer in the error shape, and delete removes it.
"""
from __future__ import annotations

import json
import shutil

import httpx
import pytest
from safetensors.torch import load_file, save_file

from _rel_live import CONFIG, T, WEIGHTS, listing, live_server, still_serving, upload, upload_folder
from _rel_tiny import make_adapter, tree


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("good") / "a", seed=1)


def config_with(good, **changes) -> bytes:
    config = json.loads((good / CONFIG).read_text())
    config.update(changes)
    return json.dumps(config).encode()          # allow_nan: writes NaN / Infinity as Python's json does


def weights_with(good, value) -> bytes:
    tensors = load_file(str(good / WEIGHTS))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = value
    path = good.parent / "w.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()


def refused(live, status, words, name="bad", **kw):
    before_list, before_tree = listing(live.url), tree(live.store)
    r = upload(live.url, name, **kw)
    assert r.status_code == status, (kw.keys(), r.text)
    error = r.json()["error"]
    assert error["code"] == status and all(w in error["message"] for w in words), (words, error)
    assert listing(live.url) == before_list and tree(live.store) == before_tree


def test_unsound_adapters_are_refused_naming_the_fault(tmp_path, good):
    config, weights = (good / CONFIG).read_bytes(), (good / WEIGHTS).read_bytes()
    with live_server(tmp_path / "store") as live:
        assert upload_folder(live.url, "ok", good).status_code == 201
        for changes, words in [({"lora_alpha": float("nan")}, ["lora_alpha", "finite"]),
                               ({"lora_alpha": float("inf")}, ["lora_alpha", "finite"]),
                               ({"lora_dropout": float("-inf")}, ["lora_dropout", "finite"]),
                               ({"alpha_pattern": {"q_proj": float("nan")}}, ["alpha_pattern", "q_proj"]),
                               ({"lora_alpha": -1e308}, ["scaling", "lora_alpha"]),
                               ({"alpha_pattern": {"v_proj": 1e9}}, ["scaling", "alpha_pattern"]),
                               ({"lora_alpha": 10**30}, ["lora_alpha", "range"])]:
            refused(live, 422, words, config=config_with(good, **changes), weights=weights)
        for value in (float("nan"), float("inf"), float("-inf")):
            refused(live, 422, ["non-finite", "lora_"], config=config, weights=weights_with(good, value))
        still_serving(live.url, "ok")


def test_reserved_names_and_two_weights_fields_are_refused(tmp_path, good):
    config, weights = (good / CONFIG).read_bytes(), (good / WEIGHTS).read_bytes()
    with live_server(tmp_path / "store") as live:
        base = httpx.get(f"{live.url}/v1/models", timeout=T).json()["data"][0]["id"]
        for name in (base, base.upper()):
            refused(live, 409, ["reserved", "base model"], name=name, config=config, weights=weights)
        for name in ("metrics", "Admin", "v1"):
            refused(live, 422, ["reserved", "route"], name=name, config=config, weights=weights)
        r = httpx.put(f"{live.url}/admin/adapters/{base}", json={"source": "local", "path": str(good)}, timeout=T)
        assert r.status_code == 409 and r.json()["error"]["code"] == 409
        before = tree(live.store)
        r = httpx.post(f"{live.url}/admin/adapters", data={"name": "both"}, timeout=T,
                       files={CONFIG: config, WEIGHTS: weights, "adapter_model.bin": weights})
        assert r.status_code == 422 and "not both" in r.json()["error"]["message"]
        assert tree(live.store) == before and listing(live.url) == []
        ids = [m["id"] for m in httpx.get(f"{live.url}/v1/models", timeout=T).json()["data"]]
        assert ids == [base]


def test_a_stored_adapter_that_fails_the_checks_is_quarantined(tmp_path, good):
    store = tmp_path / "store"
    with live_server(store) as live:
        assert upload_folder(live.url, "fine", good).status_code == 201
        assert upload_folder(live.url, "poisoned", good).status_code == 201
    # as a store written before these checks: NaN in the stored config and in registry.json
    config = json.loads((store / "poisoned" / CONFIG).read_text())
    (store / "poisoned" / CONFIG).write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    shutil.copytree(store / "fine", store / "nan-meta")
    meta = json.loads((store / "nan-meta" / "registry.json").read_text())
    (store / "nan-meta" / "registry.json").write_text(json.dumps({**meta, "created_at": float("nan")}))

    with live_server(store) as live:
        url = live.url
        r = httpx.get(f"{url}/admin/adapters", timeout=T)
        assert r.status_code == 200, r.text
        states = {a["name"]: (a["state"], a["error"]) for a in r.json()["adapters"]}
        assert states["fine"] == ("ok", None)
        assert states["poisoned"][0] == "quarantined" and "lora_alpha" in states["poisoned"][1]
        assert states["nan-meta"][0] == "ok"                 # a NaN time is shown as null, not a 500
        r = httpx.get(f"{url}/admin/adapters/poisoned", timeout=T)
        assert r.status_code == 200 and r.json()["state"] == "quarantined"
        for verb in ("activate", "deactivate"):
            r = httpx.post(f"{url}/admin/adapters/poisoned/{verb}", timeout=T)
            assert r.status_code == 409 and "quarantined" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/v1/completions", json={"model": "poisoned", "prompt": "hi", "max_tokens": 2},
                       timeout=T)
        assert r.status_code in (404, 409) and r.json()["error"]["code"] == r.status_code
        assert "poisoned" not in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=T).json()["data"]]
        still_serving(url, "fine")
        still_serving(url, "nan-meta")
        assert httpx.delete(f"{url}/admin/adapters/poisoned", timeout=T).status_code == 200
        assert not (store / "poisoned").exists()
        assert httpx.get(f"{url}/admin/adapters", timeout=T).status_code == 200
