"""Prompt tuning, P-tuning and prefix tuning adapters over HTTP on the embedded model: uploaded as PEFT folders,
listed by /v1/models with their `kind`, served through the official `openai` client with the engine's own
output, activated / deactivated / deleted as other kinds, usage counting only the prompt's real tokens; bad
configs (non-positive num_virtual_tokens, a token_dim that is not the hidden size, prompt + virtual tokens
over max_seq_len) get a 4xx naming the problem and change nothing."""
import json

import httpx
import pytest
import torch
from safetensors.torch import save_file

import adapters_core as ac
from _server import LiveServer, chat_stream_equals_whole
from service.app import create_app
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.model.decoder import Decoder
from service.settings import Settings

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 128
PROMPT = "The three primary colours are"


def write_folder(folder, config: ac.PromptLearningConfig, embeddings: torch.Tensor):
    """A PEFT prompt-learning folder: adapter_config.json and the one `prompt_embeddings` tensor."""
    config.save(str(folder))
    save_file({"prompt_embeddings": embeddings.contiguous()}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def folders(loaded, tmp_path_factory):
    c = loaded.config
    g = torch.Generator().manual_seed(0)
    kv_width = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim
    root = tmp_path_factory.mktemp("prompt_adapters")
    specs = {
        "pt": (ac.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8), 0.1, c.hidden_size),
        "ptune": (ac.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                         encoder_reparameterization_type="LSTM"), 0.1, c.hidden_size),
        "prefix": (ac.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), 1.0, kv_width),
        "long": (ac.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=100), 0.1, c.hidden_size),
    }
    out = {}
    for name, (config, std, width) in specs.items():
        (root / name).mkdir()
        rows = std * torch.randn(config.num_virtual_tokens, width, generator=g)
        out[name] = write_folder(root / name, config, rows)
    return out


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=4,
                        max_seq_len=MAX_SEQ_LEN, max_prompt_tokens=100, max_tokens_limit=32)
    with LiveServer(create_app(settings, loaded)) as live:
        yield live


def upload(server, name, folder, config_bytes=None):
    files = {"adapter_config.json": config_bytes or (folder / "adapter_config.json").read_bytes(),
             "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes()}
    return httpx.post(f"{server.url}/admin/adapters", data={"name": name}, files=files, timeout=60)


def engine_texts(loaded, folders, prompt_ids, max_tokens):
    """The engine's greedy text for each adapter, run directly (one engine step batch, all adapters)."""
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict)
    for name, folder in folders.items():
        ac.load_adapter(model, str(folder), adapter_name=name)
    engine = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=MAX_SEQ_LEN),
                    eos_token_ids=loaded.tokenizer.eos_token_ids)
    outs = engine.generate([GenerationRequest(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0), n)
                            for n in [None, *folders]])
    return {n: loaded.tokenizer.decode(o.token_ids) for n, o in zip([None, *folders], outs)}


def test_upload_serve_and_delete_each_kind(server, loaded, folders):
    from openai import OpenAI
    kinds = {"pt": "PROMPT_TUNING", "ptune": "P_TUNING", "prefix": "PREFIX_TUNING"}
    for name, kind in kinds.items():
        r = upload(server, name, folders[name])
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == kind and r.json()["rank"] is None
        assert r.json()["virtual_tokens"] == json.loads((folders[name] / "adapter_config.json").read_text())[
            "num_virtual_tokens"]
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert all(name in ids for name in kinds)
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    expected = engine_texts(loaded, {n: folders[n] for n in kinds}, prompt_ids, 8)
    for name in kinds:
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert out.choices[0].text == expected[name], name
        assert out.usage.prompt_tokens == len(prompt_ids)            # real tokens only, no virtual ones
        assert 0 < out.usage.completion_tokens <= 8
        assert out.choices[0].text != expected[None], f"{name} must change the continuation"
        listed = httpx.get(f"{server.url}/admin/adapters/{name}", timeout=60).json()
        assert listed["kind"] == kinds[name] and listed["tier"] == "device"
    chat_stream_equals_whole(client, "prefix")
    body = {"model": "ptune", "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{server.url}/admin/adapters/ptune/deactivate", timeout=60).status_code == 200
    assert httpx.get(f"{server.url}/admin/adapters/ptune", timeout=60).json()["tier"] == "stored"
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 409
    assert httpx.post(f"{server.url}/admin/adapters/ptune/activate", timeout=60).status_code == 200
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    for name in kinds:
        assert httpx.delete(f"{server.url}/admin/adapters/{name}", timeout=60).status_code == 200
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "model": name}, timeout=60)
        assert r.status_code == 404
    assert not any(name in [m.id for m in client.models.list().data] for name in kinds)


def _edited(folder, **changes) -> bytes:
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize("name, changes, status, words", [
    ("bad-zero", {"num_virtual_tokens": 0}, 422, "num_virtual_tokens"),
    ("bad-neg", {"num_virtual_tokens": -2}, 422, "num_virtual_tokens"),
    ("bad-dim", {"token_dim": 100}, 422, "token_dim"),
    ("bad-subm", {"num_transformer_submodules": 2}, 422, "num_transformer_submodules"),
    ("bad-ctx", {"num_virtual_tokens": MAX_SEQ_LEN}, 422, f"num_virtual_tokens={MAX_SEQ_LEN} leaves no room"),
    # room for the prompt's one token, none for a generated one (a probe's finding: it registered, and every
    # request on it was then refused)
    ("bad-ctx-1", {"num_virtual_tokens": MAX_SEQ_LEN - 1}, 422, "leaves no room for a prompt token and a generated"),
    # trained for another head or model: served as text generation before (a probe's finding)
    ("bad-task", {"task_type": "SEQ_CLS"}, 422, "task_type 'SEQ_CLS' is not served here"),
    ("bad-task-s2s", {"task_type": "SEQ_2_SEQ_LM"}, 422, "task_type 'SEQ_2_SEQ_LM'"),
])
def test_bad_configs_are_refused_and_change_nothing(server, folders, name, changes, status, words):
    before = httpx.get(f"{server.url}/admin/adapters", timeout=60).json()
    r = upload(server, name, folders["pt"], _edited(folders["pt"], **changes))
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/admin/adapters", timeout=60).json() == before


def test_prompt_plus_virtual_tokens_over_max_seq_len(server, loaded, folders):
    assert upload(server, "long", folders["long"]).status_code == 201
    prompt = "word " * 20
    n = len(loaded.tokenizer.encode(prompt))
    too_many = MAX_SEQ_LEN - n - 100 + 1
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "long", "prompt": prompt, "max_tokens": too_many},
                   timeout=60)
    assert r.status_code == 400 and "100 virtual tokens" in r.json()["error"]["message"], r.text
    ok = httpx.post(f"{server.url}/v1/completions",
                    json={"model": "long", "prompt": prompt, "max_tokens": too_many - 1}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] == n
    cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", timeout=60).json()["data"]}
    assert cards["long"]["max_model_len"] == MAX_SEQ_LEN - 100 and cards[loaded.name]["max_model_len"] == MAX_SEQ_LEN
    tokenized = httpx.post(f"{server.url}/tokenize", json={"model": "long", "prompt": prompt}, timeout=60).json()
    assert tokenized["max_model_len"] == MAX_SEQ_LEN - 100
    # scoring (echo, max_tokens 0) fits a prompt that fills the context: no generated token needs room
    ids = (loaded.tokenizer.encode(prompt) * 4)[:MAX_SEQ_LEN - 100]
    score = {"model": "long", "max_tokens": 0, "echo": True, "logprobs": 1}
    r = httpx.post(f"{server.url}/v1/completions", json={**score, "prompt": ids}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == len(ids), r.text
    r = httpx.post(f"{server.url}/v1/completions", json={**score, "prompt": ids + ids[:1]}, timeout=60)
    assert r.status_code == 400 and "exceeds the context limit" in r.json()["error"]["message"]
    assert "max_tokens" not in r.json()["error"]["message"]            # it asked for none
    assert httpx.delete(f"{server.url}/admin/adapters/long", timeout=60).status_code == 200
