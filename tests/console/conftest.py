"""Fixtures of the browser tests: the embedded model, the adapter files they upload, one live server with an
admin key and an inference key limited to `console-a`, one headless Chromium for the test module, and a
fresh `Console` (browser context) per test."""
from __future__ import annotations

import json
import shutil
import zipfile

import httpx
import pytest

import adapters_core as ac
from _browser import (ADMIN, CONFIG, INFER, SCREENSHOTS, T, WEIGHTS, Console, LiveServer, chromium_args,
                      require_browser)
from lora_folders import save_random_lora_of
from service.app import create_app
from service.model import load_model
from service.model.decoder import Decoder
from service.settings import Settings


@pytest.fixture(scope="module")
def loaded():
    return load_model(None)


@pytest.fixture(scope="module")
def files(loaded, tmp_path_factory):
    """`console-a` (uploaded as two files), `console-z` (as a .zip), a config naming no module of the model
    (refused), and a rank-1 adapter on one layer (the 1,000 adapters' template)."""
    root = tmp_path_factory.mktemp("console-adapters")
    good = save_random_lora_of(loaded, root / "console-a", "console_a", seed=11, r=4)
    zipped = save_random_lora_of(loaded, root / "console-z", "console_z", seed=12, r=4)
    archive = root / "console-z.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in (CONFIG, WEIGHTS):
            z.write(zipped / name, name)
    bad = root / "bad"
    bad.mkdir()
    config = json.loads((good / CONFIG).read_text())
    (bad / CONFIG).write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    shutil.copy(good / WEIGHTS, bad / WEIGHTS)
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict)
    ac.inject_adapter_in_model(ac.LoraConfig(r=1, target_modules=["q_proj"], layers_to_transform=[0],
                                             init_lora_weights=False), model, "tiny")
    ac.save_adapter(model, str(root / "tiny"), "tiny")        # 5 KB: 1,000 copies stay small
    return {"good": good, "archive": archive, "bad": bad, "tiny": root / "tiny"}


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    store = tmp_path_factory.mktemp("console-store")
    settings = Settings(adapter_dir=str(store), dtype="float32", max_batch_size=4, max_seq_len=512,
                        api_keys=[INFER], admin_key=ADMIN, key_adapters={INFER: ["console-a"]})
    with LiveServer(create_app(settings, loaded)) as live:
        live.store = store
        live.base = httpx.get(f"{live.url}/ready", timeout=T).json()["model"]
        yield live


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (Playwright gives each launch a fresh temporary profile)."""
    path = require_browser()
    from playwright.sync_api import sync_playwright
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, headless=True, args=chromium_args)
        yield chromium
        chromium.close()


@pytest.fixture
def console(browser, server):
    c = Console(browser, server)
    yield c
    c.close()
