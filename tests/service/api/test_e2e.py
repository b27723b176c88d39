"""End to end through a real uvicorn server with clients nobody here wrote: the official `openai` client and
`huggingface_hub.InferenceClient`; adapters uploaded over HTTP; outputs equal the engine's for the same
request run directly."""
import io
import tarfile

import httpx
import pytest

import adapters_core as ac
from _server import LiveServer, chat_stream_equals_whole
from lora_folders import save_random_lora_of
from service.app import create_app
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.model.decoder import Decoder
from service.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_dir(loaded, tmp_path_factory):
    """A LoRA adapter in PEFT's format, made by adapters_core on our decoder (random non-zero weights)."""
    return save_random_lora_of(loaded, tmp_path_factory.mktemp("adapter") / "sql", "sql", seed=0)


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=4,
                        max_seq_len=512, max_prompt_tokens=400, max_tokens_limit=64)
    with LiveServer(create_app(settings, loaded)) as live:
        yield live


def upload(server, name, folder):
    files = {"adapter_config.json": (folder / "adapter_config.json").read_bytes(),
             "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes()}
    return httpx.post(f"{server.url}/admin/adapters", data={"name": name}, files=files, timeout=60)


def engine_text(loaded, adapter_dir, prompt_ids, max_tokens, adapter):
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict)
    if adapter:
        ac.load_adapter(model, str(adapter_dir), adapter_name="x", autocast_adapter_dtype=False)
    engine = Engine(model, EngineConfig(max_batch_size=1, max_seq_len=512), eos_token_ids=loaded.tokenizer.eos_token_ids)
    out = engine.generate([GenerationRequest(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0),
                                             "x" if adapter else None)])[0]
    return loaded.tokenizer.decode(out.token_ids)


def test_openai_client_models_completions_and_streaming_chat(server, loaded, adapter_dir):
    from openai import OpenAI
    assert upload(server, "sql", adapter_dir).status_code == 201
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == loaded.name and "sql" in ids
    prompt = "The three primary colours are"
    base = client.completions.create(model=loaded.name, prompt=prompt, max_tokens=12, temperature=0)
    tuned = client.completions.create(model="sql", prompt=prompt, max_tokens=12, temperature=0)
    prompt_ids = loaded.tokenizer.encode(prompt)
    assert base.choices[0].text == engine_text(loaded, adapter_dir, prompt_ids, 12, False)
    assert tuned.choices[0].text == engine_text(loaded, adapter_dir, prompt_ids, 12, True)
    assert tuned.choices[0].text != base.choices[0].text
    chat_stream_equals_whole(client, "sql")


def test_huggingface_inference_client_text_generation(server, loaded, adapter_dir, monkeypatch):
    from huggingface_hub import InferenceClient, constants
    # Offline mode (set for the whole suite) also blocks loopback; this client talks only to our server.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if upload(server, "sql2", adapter_dir).status_code not in (201, 409):
        pytest.fail("upload failed")
    client = InferenceClient(base_url=server.url)
    text = client.text_generation("Water boils at", max_new_tokens=8, adapter_id="sql2")
    streamed = "".join(client.text_generation("Water boils at", max_new_tokens=8, adapter_id="sql2", stream=True))
    assert text == streamed == engine_text(loaded, adapter_dir, loaded.tokenizer.encode("Water boils at"), 8, True)


def test_adapter_lifecycle_over_http(server, adapter_dir):
    url = server.url
    assert upload(server, "life", adapter_dir).status_code == 201
    assert upload(server, "life", adapter_dir).status_code == 409
    body = {"model": "life", "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    assert httpx.post(f"{url}/admin/adapters/life/deactivate", timeout=60).status_code == 200
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 409 and "life" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/admin/adapters/life/activate", timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    assert httpx.delete(f"{url}/admin/adapters/life", timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 404
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(adapter_dir / name, arcname=name)
    r = httpx.post(f"{url}/admin/adapters", data={"name": "from-tar"},
                   files={"archive": ("a.tar.gz", data.getvalue())}, timeout=60)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "by-path", "lora_path": str(adapter_dir)},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.post(f"{url}/v1/completions", json={**body, "model": "by-path"}, timeout=60).status_code == 200


@pytest.mark.parametrize("body,status", [
    ({"model": "nope", "prompt": "Hi"}, 404),
    ({"model": 7, "prompt": "Hi"}, 422),
    ({"model": "M", "prompt": "Hi", "max_tokens": "many"}, 422),
    ({"model": "M", "prompt": "Hi", "max_tokens": 10_000}, 400),
    ({"model": "M", "prompt": "word " * 600}, 400),
])
def test_bad_requests_get_clear_errors(server, loaded, body, status):
    if body.get("model") == "M":
        body = {**body, "model": loaded.name}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_operations_routes(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/ready").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for family in ("adapter_serve_requests_total", "adapter_serve_time_to_first_token_seconds",
                   "adapter_serve_adapters", "adapter_serve_kv_cache_usage_ratio"):
        assert family in text
