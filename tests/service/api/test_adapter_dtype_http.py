"""`ADAPTER_SERVE_ADAPTER_DTYPE=bfloat16` end to end, through a real uvicorn server on the embedded model served
as the service serves it by default (the GGUF's stored blocks, fp32 activations): an fp32 adapter uploaded over
HTTP is held in bf16 (the admin routes show `dtype` and `resident_size`, `/stats` and the
`adapter_serve_adapter_bytes` metric count the bf16 bytes), the store keeps the uploaded file byte for byte, and
the greedy completion and its log-probabilities equal the engine's run directly with the adapter's weights
rounded to bf16 and held in fp32. Tolerance: the two compute the same function with fp32 activations and fp32
accumulation over exactly representable factors, so log-probabilities agree to fp32 rounding (1e-4, as the
registry tests against PEFT, which check the oracle itself on a tiny model: tests/service/registry)."""
from __future__ import annotations

import hashlib

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

import adapters_core as ac
from _server import LiveServer
from lora_folders import save_random_lora_of
from service.app import create_app
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.model import load_model
from service.model.decoder import Decoder
from service.settings import Settings

pytestmark = pytest.mark.slow

T = 120
PROMPT = "The three primary colours are"
NEW_TOKENS = 12
CONFIG, SAFETENSORS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def stored():
    """The embedded model with its weights in the GGUF's blocks (what `WEIGHT_FORMAT` auto serves on the CPU)."""
    return load_model(None, keep_stored=True)


@pytest.fixture(scope="module")
def folder(loaded, tmp_path_factory):
    return save_random_lora_of(loaded, tmp_path_factory.mktemp("adapter") / "fp32", "fp32", seed=0)


@pytest.fixture(scope="module")
def server(stored, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    settings = Settings(adapter_dir=str(store), adapter_dtype="bfloat16", max_batch_size=2, max_seq_len=256,
                        max_prompt_tokens=64, max_tokens_limit=64)
    with LiveServer(create_app(settings, stored)) as live:
        live.store = store
        yield live


def direct_logprobs(stored, folder, tmp_path, rounded: bool = True) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from an engine of our own on the server's weights, with the
    adapter's weights rounded to bf16 (or not) and held in fp32."""
    if rounded:
        tensors = load_file(folder / "adapter_model.safetensors")
        assert {t.dtype for t in tensors.values()} == {torch.float32}
        (tmp_path / "rounded").mkdir()
        save_file({k: t.bfloat16().float() for k, t in tensors.items()}, tmp_path / "rounded" / SAFETENSORS)
        (tmp_path / "rounded" / CONFIG).write_bytes((folder / CONFIG).read_bytes())
        folder = tmp_path / "rounded"
    model = Decoder.from_state_dict(stored.config, stored.state_dict, dtype=torch.float32, max_positions=256,
                                    stored=stored.stored)
    ac.load_adapter(model, str(folder), adapter_name="x", autocast_adapter_dtype=False)
    assert model.model.layers[0].self_attn.q_proj.lora_A["x"].weight.dtype == torch.float32
    engine = Engine(model, EngineConfig(max_batch_size=1, max_seq_len=256),
                    eos_token_ids=stored.tokenizer.eos_token_ids)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=True, ignore_eos=True)
    out = engine.generate([GenerationRequest(stored.tokenizer.encode(PROMPT), params, "x")])[0]
    return out.token_ids, out.logprobs


def test_fp32_upload_is_served_in_bf16(server, stored, folder, tmp_path):
    url = server.url
    files = {n: (folder / n).read_bytes() for n in (CONFIG, SAFETENSORS)}
    r = httpx.post(f"{url}/admin/adapters", data={"name": "tuned"}, files=files, timeout=T)
    assert r.status_code == 201, r.text
    weights = sum(t.numel() * t.element_size() for t in load_file(folder / SAFETENSORS).values())
    record = r.json()
    assert record["dtype"] == "bfloat16" and record["size"] == sum(len(b) for b in files.values())
    assert record["resident_size"] == record["size"] - weights // 2

    body = {"model": "tuned", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": 0,
            "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=T)
    assert r.status_code == 200, r.text
    served = r.json()["choices"][0]
    tokens, logprobs = direct_logprobs(stored, folder, tmp_path)
    assert served["text"] == stored.tokenizer.decode(tokens)
    served_logprobs = torch.tensor(served["logprobs"]["token_logprobs"])
    torch.testing.assert_close(served_logprobs, torch.tensor(logprobs), atol=1e-4, rtol=0)
    _, unrounded = direct_logprobs(stored, folder, tmp_path, rounded=False)
    assert (served_logprobs - torch.tensor(unrounded)).abs().max() > 3e-4        # (7e-4): bf16 is what served

    listing = httpx.get(f"{url}/admin/adapters", timeout=T).json()
    assert listing["adapter_dtype"] == "bfloat16"
    (shown,) = listing["adapters"]
    assert (shown["tier"], shown["dtype"], shown["resident_size"]) == ("device", "bfloat16", record["resident_size"])
    assert shown["sha256"] == hashlib.sha256(files[SAFETENSORS]).hexdigest()
    for name, data in files.items():                              # the store holds the upload as it came
        assert (server.store / "tuned" / name).read_bytes() == data
    stats = httpx.get(f"{url}/stats", timeout=T).json()["adapters"]
    assert stats["dtype"] == "bfloat16" and stats["bytes"]["device"] == record["resident_size"]
    metrics = {s.labels["tier"]: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               if f.name == "adapter_serve_adapter_bytes" for s in f.samples}
    assert metrics["device"] == record["resident_size"]
