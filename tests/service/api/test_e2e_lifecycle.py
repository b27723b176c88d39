"""End to end through a real uvicorn server: the adapter lifecycle across a restart, deletes while streams run,
bad input that must leave the registry untouched, and the Prometheus output after real traffic.

Adapters are made by adapters_core on our decoder (random non-zero LoRA weights) and written in PEFT's
format with `ac.save_adapter`; everything else goes over HTTP with httpx."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save

from lora_folders import save_random_lora
from _server import LiveServer
from service.app import create_app
from service.metrics import BASE_LABEL, Metrics
from service.model.decoder import Decoder
from service.settings import Settings

pytestmark = pytest.mark.slow

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
T = 120                                        # generous HTTP timeout: 2 cores, several requests batched

# Prompts whose greedy continuations (base model and the adapters below) run well past a few tokens.
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The weather today",
           "In 1492, Columbus", "SELECT name FROM", "The quick brown fox", "My favourite city is"]


# ----- fixtures: the model, adapter folders, a shared server -----------------------------------------------------
@pytest.fixture(scope="module")
def folders(loaded, tmp_path_factory):
    """PEFT folders: `one` and `two` (rank 4, distinct weights) and `r8` (rank 8, over the shared server's limit)."""
    root = tmp_path_factory.mktemp("adapters")
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict)
    return {"one": save_random_lora(model, root / "one", "one", seed=1),
            "two": save_random_lora(model, root / "two", "two", seed=2),
            "r8": save_random_lora(model, root / "r8", "r8", seed=3, r=8, targets=("q_proj",))}


def _settings(adapter_dir, **kw) -> Settings:
    return Settings(adapter_dir=str(adapter_dir), dtype="float32", max_batch_size=10, max_seq_len=256, **kw)


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    """One server for the stream, bad-input and metrics tests, with small limits the bad-input rows hit."""
    store = tmp_path_factory.mktemp("shared") / "store"
    settings = _settings(store, max_prompt_tokens=32, max_tokens_limit=32, max_lora_rank=4,
                         max_archive_bytes=64 * 1024)
    with LiveServer(create_app(settings, loaded)) as live:
        live.store = store
        yield live


# ----- HTTP helpers ----------------------------------------------------------------------------------------------
def upload_files(url, name, folder: Path, **extra):
    files = {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: (folder / WEIGHTS).read_bytes()}
    return httpx.post(f"{url}/admin/adapters", data={"name": name}, files=files, timeout=T, **extra)


def upload_archive(url, name, data: bytes, filename: str):
    return httpx.post(f"{url}/admin/adapters", data={"name": name}, files={"archive": (filename, data)}, timeout=T)


def put_local(url, name, folder: Path):
    return httpx.put(f"{url}/admin/adapters/{name}", json={"source": "local", "path": str(folder)}, timeout=T)


def complete(url, model, prompt, max_tokens=8, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=T)
    assert r.status_code == 200, r.text
    return r.json()


def text_of(url, model, prompt, max_tokens=8) -> str:
    return complete(url, model, prompt, max_tokens)["choices"][0]["text"]


def listing(url) -> dict:
    r = httpx.get(f"{url}/admin/adapters", timeout=T)
    assert r.status_code == 200, r.text
    return r.json()


def zip_bytes(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def model_id(url) -> str:
    return httpx.get(f"{url}/v1/models", timeout=T).json()["data"][0]["id"]


# ----- 1. restart on the same store ------------------------------------------------------------------------------
def test_restart_on_the_same_store_keeps_adapters_and_outputs(loaded, folders, tmp_path):
    store = tmp_path / "store"
    one, two = folders["one"], folders["two"]
    archive = zip_bytes({"zipped/" + CONFIG: (one / CONFIG).read_bytes(),
                         "zipped/" + WEIGHTS: (one / WEIGHTS).read_bytes(),
                         "zipped/README.md": b"an adapter in a folder of its own\n"})
    prompts = PROMPTS[:2]

    def snapshot(url):
        # Everything the registry persists; the tier (cpu after upload, stored after a restart) is runtime state.
        return {a["name"]: {k: a[k] for k in ("sha256", "size", "kind", "rank", "alpha", "targets", "source",
                                               "served", "pinned", "created_at")}
                for a in listing(url)["adapters"]}

    def outputs(url):
        base = model_id(url)
        return {(m, p): text_of(url, m, p) for m in (base, "zipped", "bypath") for p in prompts}

    with LiveServer(create_app(_settings(store), loaded)) as first:
        r = upload_archive(first.url, "zipped", archive, "zipped.zip")
        assert r.status_code == 201, r.text
        assert r.json()["source"] == {"type": "upload", "filename": "zipped.zip"}
        r = put_local(first.url, "bypath", two)
        assert r.status_code == 201, r.text
        before = snapshot(first.url)
        texts = outputs(first.url)
    assert sorted(before) == ["bypath", "zipped"]
    # The store keeps the uploaded weights byte for byte.
    assert before["zipped"]["sha256"] == hashlib.sha256((one / WEIGHTS).read_bytes()).hexdigest()
    assert before["bypath"]["sha256"] == hashlib.sha256((two / WEIGHTS).read_bytes()).hexdigest()
    base = loaded.name
    for p in prompts:                          # every output is non-empty; the adapters change something
        assert all(texts[(m, p)] for m in (base, "zipped", "bypath"))
    assert any(texts[(a, p)] != texts[(base, p)] for a in ("zipped", "bypath") for p in prompts)
    assert sorted(os.listdir(store)) == ["bypath", "zipped"]          # no staging or trash left behind

    with LiveServer(create_app(_settings(store), loaded)) as second:
        after = snapshot(second.url)
        assert {a["name"]: a["tier"] for a in listing(second.url)["adapters"]} == {"bypath": "stored",
                                                                                   "zipped": "stored"}
        models = [m["id"] for m in httpx.get(f"{second.url}/v1/models", timeout=T).json()["data"]]
        assert models == [base, "bypath", "zipped"]
        assert outputs(second.url) == texts
    assert after == before


# ----- 2. delete while streams run ---------------------------------------------------------------------------------
class Stream(threading.Thread):
    """One streaming /v1/completions request; collects the text and notes when the first chunk came."""

    def __init__(self, url, body):
        super().__init__(daemon=True)
        self.url, self.body = url, {**body, "stream": True}
        self.first = threading.Event()
        self.pieces, self.finish, self.done, self.status, self.error, self.ended_at = [], None, False, None, None, None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def run(self):
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=T) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        continue
                    choice = json.loads(line[len("data: "):])["choices"][0]
                    self.pieces.append(choice["text"])
                    self.finish = choice["finish_reason"] or self.finish
                    self.first.set()
        except BaseException as exc:           # reported by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first.set()


def test_delete_while_streams_run(server, folders):
    url, a, b = server.url, "stream-a", "stream-b"
    assert put_local(url, a, folders["one"]).status_code == 201
    bodies = [{"model": a, "prompt": p, "max_tokens": 24, "temperature": 0} for p in PROMPTS]

    # Reference outputs first, non-streaming, batched like the streams will be.
    with ThreadPoolExecutor(len(bodies)) as pool:
        refs = list(pool.map(lambda body: httpx.post(f"{url}/v1/completions", json=body, timeout=T), bodies))
    assert all(r.status_code == 200 for r in refs), [r.text for r in refs]
    ref = [(r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]) for r in refs]
    assert max(r.json()["usage"]["completion_tokens"] for r in refs) == 24

    streams = [Stream(url, body) for body in bodies]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(T), "a stream never started"
    assert all(s.error is None and s.status == 200 for s in streams), [(s.status, s.error) for s in streams]
    in_use = httpx.get(f"{url}/admin/adapters/{a}", timeout=T).json()["in_use"]
    # every running stream holds the adapter (on a slow machine the first may finish before the last starts)
    assert 1 <= in_use <= len(streams)
    if all(s.ended_at is None for s in streams):
        assert in_use == len(streams)

    started = time.monotonic()
    r = httpx.delete(f"{url}/admin/adapters/{a}", timeout=T)
    deleted_at = time.monotonic()
    assert r.status_code == 200 and r.json() == {"deleted": a}, r.text
    assert deleted_at - started < 2.0, "the delete waited for the running requests"
    assert any(s.ended_at is None or s.ended_at > deleted_at for s in streams), "the streams ended before the delete"

    # The name is gone at once, for new requests of both kinds and for the admin API.
    r = httpx.post(f"{url}/v1/completions", json=bodies[0], timeout=T)
    assert r.status_code == 404 and a in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/completions", json={**bodies[0], "stream": True}, timeout=T)
    assert r.status_code == 404, r.text
    assert httpx.get(f"{url}/admin/adapters/{a}", timeout=T).status_code == 404
    assert a not in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=T).json()["data"]]

    # Meanwhile another adapter comes, serves a request (loaded into the model between steps) and goes.
    assert put_local(url, b, folders["two"]).status_code == 201
    assert complete(url, b, "Hi", max_tokens=2)["choices"][0]["text"]
    r = httpx.delete(f"{url}/admin/adapters/{b}", timeout=T)
    assert r.status_code == 200, r.text
    b_done = time.monotonic()

    for s in streams:
        s.join(T)
        assert not s.is_alive()
    assert any(s.ended_at > b_done for s in streams), "the streams ended before adapter B came and went"
    for s, (text, finish) in zip(streams, ref):
        assert s.error is None and s.done, (s.error, s.done)
        assert s.text == text and s.finish == finish, (s.body["prompt"], s.text, text)

    names = [x["name"] for x in listing(url)["adapters"]]
    assert a not in names and b not in names
    # A's memory is freed at its last release: the tiers count no deleted adapter any more.
    deadline = time.monotonic() + 30
    while True:
        body = listing(url)
        if sum(body["tiers"].values()) == len(body["adapters"]):
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert not [e for e in os.listdir(server.store) if e.startswith(".")]

    # The name can be registered again and serves the same adapter as before.
    assert put_local(url, a, folders["one"]).status_code == 201
    assert text_of(url, a, PROMPTS[0], 24) == ref[0][0]
    assert httpx.delete(f"{url}/admin/adapters/{a}", timeout=T).status_code == 200


# ----- 3. bad input -------------------------------------------------------------------------------------------------
class Evil:
    """Unpickling this creates `path`: a stand-in for arbitrary code in a pickled checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def evil_bin(path, torch_format: bool) -> bytes:
    payload = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Evil(path)}
    if not torch_format:
        return pickle.dumps(payload, protocol=2)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad(server, folders, tmp_path_factory):
    """The reference adapter `ref` on the shared server, its greedy text, and the inputs the rows need."""
    root = tmp_path_factory.mktemp("bad")
    # The payload is live: loaded without weights_only it does create its file.
    control = root / "control-marker"
    torch.load(io.BytesIO(evil_bin(control, True)), weights_only=False)
    assert control.exists()
    r = upload_files(server.url, "ref", folders["two"])
    assert r.status_code in (201, 409), r.text
    one = folders["one"]
    tensors = load_file(str(one / WEIGHTS))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    wrong = dict(tensors, **{key: torch.randn(tensors[key].shape[0], 100)})
    weights = (one / WEIGHTS).read_bytes()
    return {"ref_text": text_of(server.url, "ref", PROMPTS[0]), "marker": root / "marker",
            "config": (one / CONFIG).read_bytes(), "weights": weights, "wrong_shapes": save(wrong),
            "real_weights_path": str(one / WEIGHTS)}


def _symlink_zip(config: bytes, target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(CONFIG, config)
        info = zipfile.ZipInfo(WEIGHTS)
        info.create_system = 3                                     # unix, so the mode bits count
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return buf.getvalue()


def _symlink_tar(config: bytes, target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(CONFIG)
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        link = tarfile.TarInfo(WEIGHTS)
        link.type, link.linkname = tarfile.SYMTYPE, target
        tar.addfile(link)
    return buf.getvalue()


def _files(url, name, config: bytes, weights: bytes, weights_name=WEIGHTS):
    return httpx.post(f"{url}/admin/adapters", data={"name": name}, files={CONFIG: config, weights_name: weights},
                      timeout=T)


def _completion(url, **body):
    return httpx.post(f"{url}/v1/completions", json=body, timeout=T)


# id, request (server url, base model id, inputs) -> response, expected status (or a set of allowed ones)
ROWS = [
    ("unknown-adapter", lambda u, m, x: _completion(u, model="nope", prompt="Hi", max_tokens=2), 404),
    ("unknown-adapter-stream",
     lambda u, m, x: _completion(u, model="nope", prompt="Hi", max_tokens=2, stream=True), 404),
    ("malformed-json", lambda u, m, x: httpx.post(f"{u}/v1/completions", content=b'{"model": "ref", "prompt": ',
                                                   headers={"content-type": "application/json"}, timeout=T), 422),
    ("malformed-json-admin", lambda u, m, x: httpx.put(f"{u}/admin/adapters/x", content=b'{"source": "loc',
                                                        headers={"content-type": "application/json"}, timeout=T), 422),
    ("model-not-a-string", lambda u, m, x: _completion(u, model=["ref"], prompt="Hi", max_tokens=2), 422),
    ("max-tokens-wrong-type", lambda u, m, x: _completion(u, model=m, prompt="Hi", max_tokens="many"), 422),
    ("prompt-too-long", lambda u, m, x: _completion(u, model="ref", prompt="word " * 100, max_tokens=2), 400),
    ("max-tokens-over-limit", lambda u, m, x: _completion(u, model=m, prompt="Hi", max_tokens=33), 400),
    ("rank-over-limit", lambda u, m, x: upload_files(u, "rank8", x["folders"]["r8"]), 422),
    ("wrong-shapes", lambda u, m, x: _files(u, "shapes", x["config"], x["wrong_shapes"]), 422),
    ("truncated-safetensors",
     lambda u, m, x: _files(u, "truncated", x["config"], x["weights"][:len(x["weights"]) // 2]), {400, 422}),
    ("pickle-bin-torch", lambda u, m, x: _files(u, "pickled", x["config"], evil_bin(x["marker"], True),
                                                "adapter_model.bin"), {400, 422}),
    ("pickle-bin-raw", lambda u, m, x: _files(u, "pickled", x["config"], evil_bin(x["marker"], False),
                                              "adapter_model.bin"), {400, 422}),
    ("zip-dotdot", lambda u, m, x: upload_archive(u, "dotdot", zip_bytes({CONFIG: x["config"],
                                                                          "../escaped.txt": b"out"}), "a.zip"),
     {400, 422}),
    ("zip-symlink", lambda u, m, x: upload_archive(u, "symlink", _symlink_zip(x["config"], x["real_weights_path"]),
                                                   "a.zip"), {400, 422}),
    ("tar-symlink", lambda u, m, x: upload_archive(u, "symlink", _symlink_tar(x["config"], x["real_weights_path"]),
                                                   "a.tar.gz"), {400, 422}),
    ("archive-too-large", lambda u, m, x: upload_archive(u, "big", zip_bytes({CONFIG: x["config"],
                                                                              WEIGHTS: x["weights"]},
                                                                             zipfile.ZIP_STORED), "a.zip"), 413),
    ("name-dotdot", lambda u, m, x: _files(u, "../x", x["config"], x["weights"]), 422),
    ("name-space", lambda u, m, x: _files(u, "a b", x["config"], x["weights"]), 422),
    ("name-space-put", lambda u, m, x: put_local(u, "a b", x["folders"]["one"]), 422),
    ("duplicate-upload", lambda u, m, x: _files(u, "ref", x["config"], x["weights"]), 409),
    ("duplicate-put", lambda u, m, x: put_local(u, "ref", x["folders"]["one"]), 409),
]


@pytest.mark.parametrize("make,status", [pytest.param(make, status, id=rid) for rid, make, status in ROWS])
def test_bad_input_is_refused_and_changes_nothing(server, loaded, folders, bad, make, status):
    url = server.url

    def state():
        return ({a["name"]: (a["sha256"], a["size"], a["served"]) for a in listing(url)["adapters"]},
                sorted(os.listdir(server.store)))

    before = state()
    assert "ref" in before[0]
    r = make(url, loaded.name, {**bad, "folders": folders})
    allowed = status if isinstance(status, set) else {status}
    assert r.status_code in allowed, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["message"] and error["code"] == r.status_code, r.text
    assert state() == before
    assert not bad["marker"].exists(), "the pickled checkpoint ran code"
    assert not (server.store / "escaped.txt").exists() and not (server.store.parent / "escaped.txt").exists()
    assert text_of(url, "ref", PROMPTS[0]) == bad["ref_text"]


# ----- 4. metrics ----------------------------------------------------------------------------------------------------
def scrape(url) -> dict:
    r = httpx.get(f"{url}/metrics", timeout=T)
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families, family, sample, **labels) -> float:
    return sum(s.value for s in families[family].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_after_traffic(server, loaded, folders):
    url, name, base = server.url, "metered", loaded.name
    before = scrape(url)

    assert put_local(url, name, folders["one"]).status_code == 201
    usage = {BASE_LABEL: [], name: []}
    for model, label in ((base, BASE_LABEL), (name, name)):
        for prompt in PROMPTS[:2]:
            usage[label].append(complete(url, model, prompt, max_tokens=4)["usage"])
    stream = Stream(url, {"model": name, "prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0})
    stream.run()                               # in this thread
    assert stream.error is None and stream.status == 200 and stream.done
    assert stream.finish == "length"           # so it generated its 4 tokens
    # Deactivating an adapter that is on the device moves it down a tier: an eviction.
    assert httpx.post(f"{url}/admin/adapters/{name}/deactivate", timeout=T).status_code == 200
    assert httpx.delete(f"{url}/admin/adapters/{name}", timeout=T).status_code == 200

    after = scrape(url)
    defined = {m.name for m in Metrics().registry.collect()}
    assert defined <= set(after), defined - set(after)
    empty = [f for f in defined if not after[f].samples]
    assert not empty, f"families with no samples after traffic: {empty}"

    def delta(family, sample, **labels):
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    requests = after["adapter_serve_requests"]
    assert {s.labels["adapter"] for s in requests.samples} >= {BASE_LABEL, name}
    assert delta("adapter_serve_requests", "adapter_serve_requests_total", adapter=BASE_LABEL, outcome="success") == 2
    assert delta("adapter_serve_requests", "adapter_serve_requests_total", adapter=name, outcome="success") == 3
    for label, uses in usage.items():
        streamed = 4 if label == name else 0
        assert delta("adapter_serve_generated_tokens", "adapter_serve_generated_tokens_total", adapter=label) == \
            sum(u["completion_tokens"] for u in uses) + streamed
        prompt_tokens = sum(u["prompt_tokens"] for u in uses)
        if label == name:
            prompt_tokens += len(loaded.tokenizer.encode(PROMPTS[2]))
        assert delta("adapter_serve_prompt_tokens", "adapter_serve_prompt_tokens_total", adapter=label) == \
            prompt_tokens
        finished = len(uses) + (1 if label == name else 0)
        assert delta("adapter_serve_request_latency_seconds", "adapter_serve_request_latency_seconds_count",
                     adapter=label) == finished
        assert delta("adapter_serve_time_to_first_token_seconds",
                     "adapter_serve_time_to_first_token_seconds_count", adapter=label) == finished
    assert delta("adapter_serve_adapter_uploads", "adapter_serve_adapter_uploads_total") == 1
    assert delta("adapter_serve_adapter_deletes", "adapter_serve_adapter_deletes_total") == 1
    assert delta("adapter_serve_adapter_evictions", "adapter_serve_adapter_evictions_total", from_tier="device") == 1
    assert delta("adapter_serve_adapter_load_seconds", "adapter_serve_adapter_load_seconds_count") >= 1
    assert value(after, "adapter_serve_batch_size", "adapter_serve_batch_size_count") > 0
    tiers = {s.labels["tier"]: s.value for s in after["adapter_serve_adapters"].samples}
    body = listing(url)
    assert tiers == {k: float(v) for k, v in body["tiers"].items()}


def test_metrics_count_requests_the_registry_refuses(server, folders):
    url, name = server.url, "refused"
    assert put_local(url, name, folders["one"]).status_code == 201
    assert httpx.post(f"{url}/admin/adapters/{name}/deactivate", timeout=T).status_code == 200
    before = scrape(url)
    try:
        # The name exists, so the route passes it on; the registry's acquire refuses it (409).
        r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2}, timeout=T)
        assert r.status_code == 409 and "deactivated" in r.json()["error"]["message"], r.text
        after = scrape(url)
    finally:
        assert httpx.delete(f"{url}/admin/adapters/{name}", timeout=T).status_code == 200
    sample = "adapter_serve_requests_total"
    # GenerationRequest refusals of the same request path (bad limits, full queue) are counted as "rejected".
    assert value(after, "adapter_serve_requests", sample, adapter=name, outcome="rejected") - \
        value(before, "adapter_serve_requests", sample, adapter=name, outcome="rejected") == 1
