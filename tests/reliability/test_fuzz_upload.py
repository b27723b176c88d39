"""Hypothesis feeds malformed uploads to `POST /admin/adapters` on a real server: broken
`adapter_config.json` files, corrupted safetensors files (length prefix, JSON header, dtype, shape, offsets,
keys, truncation, trailing bytes) and hostile archives (path traversal, links, devices, bombs, nesting,
wrong names, truncation, wrong extension). Every case must get a 4xx in OpenAI's error shape and leave
everything as it was: the adapter list, every byte under the store's parent folder (so nothing escaped
it), and the reference adapter's output. Bounded and reproducible (a fixed seed); `REL_FUZZ_EXAMPLES`
scales the examples, `REL_FUZZ_RANDOM=1` draws fresh ones.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from _rel_live import CONFIG, T, WEIGHTS, listing, live_server, still_serving, upload_folder
from _rel_malformed import archives, configs, safetensors_files
from _rel_tiny import make_adapter, tree

pytestmark = pytest.mark.slow

EXAMPLES = 2 * int(os.environ.get("REL_FUZZ_EXAMPLES", "10"))
# A fixed seed, so every run draws the same inputs (derandomize did not give repeatable runs here).
SEED = None if os.environ.get("REL_FUZZ_RANDOM") == "1" else 20261125
MAX_ARCHIVE_BYTES = 64 * 1024
RANK = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("upload-fuzz")
    folder = make_adapter(root / "src", seed=3, r=RANK)
    with live_server(root / "box" / "store", max_archive_bytes=MAX_ARCHIVE_BYTES, max_lora_rank=8) as live:
        assert upload_folder(live.url, "ref", folder).status_code == 201
        yield {"url": live.url, "box": root / "box", "config": (folder / CONFIG).read_bytes(),
               "weights": (folder / WEIGHTS).read_bytes()}


def greedy(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": "ref", "prompt": "hello", "max_tokens": 6,
                                                  "temperature": 0}, timeout=T)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _fuzz(env, strategy, name: str):
    url = env["url"]
    reference = greedy(url)
    before = (listing(url), tree(env["box"]))
    statuses: Counter = Counter()

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def fuzz(case):
        files = {CONFIG: env["config"], WEIGHTS: env["weights"]} if case["kind"] != "archive" else {}
        files.update(case["files"])
        r = httpx.post(f"{url}/admin/adapters", data={"name": "fuzzed"}, files=files, timeout=T)
        statuses[r.status_code] += 1
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == r.status_code and error["message"], r.text
        assert (listing(url), tree(env["box"])) == before, ("a refused upload changed the registry or the files", r.status_code, r.text, case)

    started = time.monotonic()
    fuzz()
    print(f"\n{name}: {sum(statuses.values())} malformed uploads in {time.monotonic() - started:.1f} s, "
          f"statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= min(EXAMPLES, 10)
    assert greedy(url) == reference
    still_serving(url, "ref")


def test_malformed_adapter_config(env):
    _fuzz(env, configs(env["config"], RANK), "adapter_config.json")


def test_malformed_safetensors(env):
    _fuzz(env, safetensors_files(env["weights"]), "safetensors")


def test_malicious_and_malformed_archives(env):
    _fuzz(env, archives(env["config"], env["weights"], MAX_ARCHIVE_BYTES), "archives")


def test_the_valid_upload_the_fuzz_starts_from_is_accepted(env):
    """The control: the unmutated files are accepted, so the refusals above are about the mutations."""
    files = {CONFIG: env["config"], WEIGHTS: env["weights"]}
    r = httpx.post(f"{env['url']}/admin/adapters", data={"name": "control"}, files=files, timeout=T)
    assert r.status_code == 201, r.text
    assert json.loads(httpx.delete(f"{env['url']}/admin/adapters/control", timeout=T).text) == {"deleted": "control"}
