"""The Ray Serve application (service/ray_serve) on a real local Ray cluster: an ingress and 2 engine replicas of
a tiny random Llama sharing one adapter store, driven with the openai client through the ingress.

Checked, in order, on one cluster: every request for an adapter after its first is served by the replica that
served the first (`X-Replica`), and outputs (completions, and a chat streamed through the ingress) equal the
single-process service's; an adapter uploaded through the ingress is served by both replicas at once (no
periodic rescan is configured) and a deleted one is refused by both; killing the actor of one replica while
clients run leaves the other serving every adapter (after loading it) and no client that retries 503 / 429
ever sees another 5xx. Without ray installed the test skips, except under CI (`make test` installs the
`ray` extra), where that is a failure.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service" / "api"))
from _load_model_folder import write_tiny_model  # noqa: E402
from _server import LiveServer, chat_stream_equals_whole  # noqa: E402
from lora_folders import save_random_lora_of  # noqa: E402
from service.app import create_app  # noqa: E402
from service.model import load_model  # noqa: E402
from service.settings import Settings  # noqa: E402

pytestmark = pytest.mark.slow

if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
    import ray  # noqa: F401  (under CI a missing ray is a failure, not a skip)
ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

APP = "adapter-serving"
ADAPTERS = ["a", "b", "c", "d"]
PROMPT = "The quick brown fox"
T = 120
ROUTING_LAG = 1.5          # seconds for a replica's new adapter to reach the ingress's router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_settings(model: Path, store: Path) -> dict:
    return dict(model=str(model), served_model_name="tiny", adapter_dir=str(store), dtype="float32",
                max_batch_size=4, max_seq_len=128, max_prompt_tokens=64, max_tokens_limit=16, max_waiting=32,
                max_device_adapters=4)


def upload(url: str, name: str, folder: Path) -> httpx.Response:
    files = {f: (folder / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    return httpx.post(f"{url}/admin/adapters", data={"name": name}, files=files, timeout=T)


def complete(client, model: str):
    """(text, replica) of a greedy completion through `client`."""
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    return raw.parse().choices[0].text, raw.headers["x-replica"]


def body(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()


def on_every_replica(handle, model: str) -> list[tuple[int, str, str]]:
    """(status, replica, text or error) of one completion asked of every replica through `broadcast`."""
    from service.ray_serve.forward import ForwardedRequest

    request = ForwardedRequest("POST", "/v1/completions", b"", [(b"content-type", b"application/json")], body(model))
    out = []
    for result in handle.broadcast("call", request).results(timeout_s=T, return_exceptions=True):
        if isinstance(result, ray.exceptions.RayActorError):
            continue                                      # a replica killed since the router last looked
        status, headers, content = result
        data = json.loads(content)
        replica = dict(headers)[b"x-replica"].decode()
        out.append((status, replica, data["choices"][0]["text"] if status == 200 else data["error"]["message"]))
    return sorted(out, key=lambda r: r[1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model = write_tiny_model(root / "model", hidden=64, layers=2)
    loaded = load_model(str(model))
    adapters = {name: save_random_lora_of(loaded, root / f"lora-{name}", name, seed=i + 1, r=4,
                                          targets=("q_proj", "v_proj"))
                for i, name in enumerate(ADAPTERS + ["e"])}
    return root, model, adapters


@pytest.fixture(scope="module")
def reference(folders):
    """Greedy outputs of the single-process service (uvicorn, one engine) for the base and every adapter."""
    root, model, adapters = folders
    with LiveServer(create_app(Settings(**service_settings(model, root / "store-single")))) as live:
        for name, folder in adapters.items():
            assert upload(live.url, name, folder).status_code == 201
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        texts = {name: complete(client, name)[0] for name in ["tiny"] + list(adapters)}
        texts["chat"] = chat_stream_equals_whole(client, "a")
    return texts


@pytest.fixture(scope="module")
def cluster(folders):
    from service.ray_serve.app import build

    root, model, _ = folders
    port = free_port()
    started = time.monotonic()
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"settings": service_settings(model, root / "store"), "max_adapters_per_replica": 4}),
                  name=APP, route_prefix="/")
        print(f"ray cluster and app up in {time.monotonic() - started:.1f} s")
        yield f"http://127.0.0.1:{port}", serve.get_deployment_handle("EngineReplica", APP)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_affinity_outputs_and_streaming_through_the_ingress(cluster, folders, reference):
    url, _ = cluster
    _, _, adapters = folders
    for name in ADAPTERS:
        r = upload(url, name, adapters[name])
        assert r.status_code == 201, r.text
        assert r.headers["x-replicas-rescanned"] == "2/2"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    served_by: dict[str, list[str]] = {name: [] for name in ADAPTERS}
    for round_ in range(3):                             # interleaved: a b c d a b c d ...
        for name in ADAPTERS:
            text, replica = complete(client, name)
            assert text == reference[name], name
            served_by[name].append(replica)
            if round_ == 0:
                # A replica reports the adapters it holds to Serve's controller, which passes them on to the
                # ingress's router: about a second, during which a request for the new adapter is routed
                # as if no replica held it.
                time.sleep(ROUTING_LAG)
    for name, replicas in served_by.items():
        assert len(set(replicas)) == 1, (name, replicas)     # affinity: the replica that loaded it
    bases = {complete(client, "tiny") for _ in range(4)}
    assert {text for text, _ in bases} == {reference["tiny"]}
    assert chat_stream_equals_whole(client, "a") == reference["chat"]    # SSE through the ingress
    bad = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=T)
    assert bad.status_code == 404 and bad.json()["error"]["code"] == 404 and bad.headers["x-replica"]


def test_an_upload_is_served_by_both_replicas_and_a_delete_refused_by_both(cluster, folders, reference):
    url, handle = cluster
    _, _, adapters = folders
    r = upload(url, "e", adapters["e"])
    assert r.status_code == 201 and r.headers["x-replicas-rescanned"] == "2/2", r.text
    answers = on_every_replica(handle, "e")               # no periodic rescan: the broadcast did it
    assert len({replica for _, replica, _ in answers}) == 2
    assert [(status, text) for status, _, text in answers] == [(200, reference["e"])] * 2
    r = httpx.delete(f"{url}/admin/adapters/e", timeout=T)
    assert r.status_code == 200 and r.headers["x-replicas-rescanned"] == "2/2", r.text
    answers = on_every_replica(handle, "e")
    assert [status for status, _, _ in answers] == [404, 404], answers
    assert httpx.post(f"{url}/v1/completions", content=body("e"), headers={"content-type": "application/json"},
                      timeout=T).status_code == 404


def test_killing_a_replica_leaves_the_other_serving_every_adapter(cluster, reference):
    url, handle = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    victim = complete(client, "a")[1]
    (survivor,) = {replica for _, replica, _ in on_every_replica(handle, "a")} - {victim}
    stop, seen_5xx, retried = threading.Event(), [], []

    def run_client(name: str) -> list[tuple[str, str]]:
        """Requests for `name` until told to stop (at least 3 after that), retrying 503 / 429 as clients do."""
        results, after_stop, deadline = [], 0, time.monotonic() + T
        while after_stop < 3 and time.monotonic() < deadline:
            try:
                results.append(complete(client, name))
            except openai.APIStatusError as exc:
                if exc.status_code in (429, 503):
                    retried.append(exc.status_code)
                    time.sleep(float(exc.response.headers.get("retry-after", "1")) / 4)
                    continue
                seen_5xx.append((exc.status_code, exc.message))
                raise
            if stop.is_set():
                after_stop += 1
        return results

    with concurrent.futures.ThreadPoolExecutor(len(ADAPTERS)) as pool:
        futures = {name: pool.submit(run_client, name) for name in ADAPTERS}
        time.sleep(1.0)
        (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "EngineReplica" in a["name"] and a["name"].endswith(f"#{victim}")]
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        time.sleep(2.0)
        stop.set()
        results = {name: f.result() for name, f in futures.items()}
    assert seen_5xx == []
    for name, answers in results.items():
        assert answers and {text for text, _ in answers} == {reference[name]}, name
        assert victim not in {replica for _, replica in answers[-3:]}, name   # served elsewhere after the kill
    for name in ADAPTERS:                                 # the survivor (and any replacement) serves every adapter
        answers = on_every_replica(handle, name)
        assert survivor in {replica for _, replica, _ in answers} and victim not in {r for _, r, _ in answers}
        assert {(status, text) for status, _, text in answers} == {(200, reference[name])}, answers
    print(f"503/429 answers retried by the clients: {len(retried)}")
