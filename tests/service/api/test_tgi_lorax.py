"""TGI / LoRAX routes end to end through a real uvicorn server on the embedded model, with the real, unmodified
clients from PyPI: `huggingface_hub.InferenceClient` (`text_generation` with details, streaming,
`get_endpoint_info`), `text-generation` (TGI's client) and `lorax-client` (`generate`, `generate_stream`
with `adapter_id` and `adapter_source`). The clients parse every answer with their own types, so a field
they need (LoRAX's `details.prompt_tokens`, a float `logprob` on every streamed token) cannot be missing;
streamed and whole answers agree token by token; every field the server does not do is a 422 naming it."""
from __future__ import annotations

import httpx
import pytest

from lora_folders import save_random_lora_of
from _server import LiveServer
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.slow

T = 120
PROMPT = "Water boils at"


@pytest.fixture(scope="module")
def folder(loaded, tmp_path_factory):
    return save_random_lora_of(loaded, tmp_path_factory.mktemp("adapters") / "sql", "sql", seed=1)


@pytest.fixture(scope="module")
def server(loaded, folder, tmp_path_factory):
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=4,
                        max_seq_len=512, max_prompt_tokens=400, max_tokens_limit=64)
    with LiveServer(create_app(settings, loaded)) as live:
        files = {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
        assert httpx.post(f"{live.url}/admin/adapters", data={"name": "sql"}, files=files, timeout=T).status_code == 201
        r = httpx.put(f"{live.url}/admin/adapters/from-folder", json={"source": "local", "path": str(folder)},
                      timeout=T)
        assert r.status_code in (200, 201), r.text
        yield live


@pytest.fixture
def hf(server, monkeypatch):
    from huggingface_hub import InferenceClient, constants
    # Offline mode (set for the whole suite) also blocks loopback; this client talks only to our server.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(base_url=server.url)


def generate(server, **parameters) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=T)


def test_huggingface_hub_details_stream_top_tokens_and_info(hf, server, loaded):
    out = hf.text_generation(PROMPT, max_new_tokens=8, details=True, adapter_id="sql")
    d = out.details
    assert d.finish_reason in ("length", "eos_token") and d.generated_tokens == len(d.tokens) and d.prefill == []
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 for t in d.tokens)
    assert "".join(t.text for t in d.tokens if not t.special) == out.generated_text
    events = list(hf.text_generation(PROMPT, max_new_tokens=8, details=True, stream=True, adapter_id="sql"))
    assert [e.token.id for e in events] == [t.id for t in d.tokens]
    assert [e.token.logprob for e in events] == pytest.approx([t.logprob for t in d.tokens], abs=1e-4)
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert all(e.details is None and e.generated_text is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == out.generated_text
    assert (last.details.finish_reason, last.details.generated_tokens) == (d.finish_reason, d.generated_tokens)
    assert last.details.input_length == len(loaded.tokenizer.encode(PROMPT))

    top = hf.text_generation(PROMPT, max_new_tokens=4, details=True, top_n_tokens=3).details
    assert len(top.top_tokens) == len(top.tokens)
    for chosen, alternatives in zip(top.tokens, top.top_tokens):
        if chosen.special:                      # an EOS that ended it: the engine reports no alternatives
            continue
        # huggingface_hub leaves the nested lists' tokens as dicts
        assert len(alternatives) == 3 and alternatives[0]["id"] == chosen.id      # greedy: the most likely one
        assert [a["logprob"] for a in alternatives] == sorted((a["logprob"] for a in alternatives), reverse=True)
    streamed = list(hf.text_generation(PROMPT, max_new_tokens=4, details=True, stream=True, top_n_tokens=2))
    assert all(len(e.top_tokens) == 2 for e in streamed if not e.token.special)
    full = hf.text_generation(PROMPT, max_new_tokens=4, return_full_text=True)
    assert full.startswith(PROMPT) and len(full) > len(PROMPT)

    from huggingface_hub import InferenceClient
    info = InferenceClient(server.url, provider="hf-inference").get_endpoint_info()
    assert info["model_id"] == loaded.name and info["max_total_tokens"] == 512
    assert info["max_input_length"] == info["max_input_tokens"] == 400


def test_text_generation_client(server, loaded):
    from text_generation import Client
    from text_generation.errors import ValidationError
    from text_generation.types import FinishReason

    client = Client(server.url, timeout=T)
    whole = client.generate(PROMPT, max_new_tokens=8)
    assert whole.details.generated_tokens == len(whole.details.tokens)
    assert whole.generated_text == generate(server, max_new_tokens=8).json()["generated_text"]
    events = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert "".join(e.token.text for e in events if not e.token.special) == whole.generated_text
    assert events[-1].details.finish_reason == whole.details.finish_reason

    # a stop sequence ends the text with it, as in TGI
    stop = whole.generated_text.split()[1]
    stopped = client.generate(PROMPT, max_new_tokens=8, stop_sequences=[stop])
    assert stopped.details.finish_reason == FinishReason.StopSequence and stopped.generated_text.endswith(stop)

    # sampling: the seed is reported, and the same seed gives the same text
    a = client.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.9, seed=7)
    b = client.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.9, seed=7)
    assert a.details.seed == 7 and a.generated_text == b.generated_text
    assert isinstance(client.generate(PROMPT, max_new_tokens=2, do_sample=True).details.seed, int)
    penalised = client.generate(PROMPT, max_new_tokens=8, repetition_penalty=1.5)
    assert penalised.details.generated_tokens >= 1

    # best_of: sequences with their own seeds in one batch; the highest mean log-probability answers
    best = client.generate(PROMPT, max_new_tokens=6, best_of=3, do_sample=True, temperature=1.5)
    others = best.details.best_of_sequences
    assert len(others) == 2 and len({best.details.seed, *(o.seed for o in others)}) == 3

    def mean(tokens):
        return sum(t.logprob for t in tokens) / len(tokens)
    assert all(mean(best.details.tokens) >= mean(o.tokens) for o in others)

    typical = client.generate(PROMPT, max_new_tokens=6, typical_p=0.5)        # a warper: sampling, TGI's rule
    assert isinstance(typical.details.seed, int) and typical.details.generated_tokens >= 1

    for kwargs, field in (({"watermark": True}, "watermark"), ({"best_of": 2}, "best_of")):
        with pytest.raises(ValidationError, match=field):
            client.generate(PROMPT, max_new_tokens=2, **kwargs)


def test_lorax_client_adapter_id_and_source(server, loaded, folder):
    from lorax import Client
    from lorax.errors import ValidationError

    client = Client(server.url, timeout=T)
    whole = client.generate(PROMPT, adapter_id="sql", max_new_tokens=8)
    assert whole.details.prompt_tokens == len(loaded.tokenizer.encode(PROMPT))
    assert whole.details.generated_tokens == len(whole.details.tokens)
    assert whole.generated_text == generate(server, adapter_id="sql", max_new_tokens=8).json()["generated_text"]
    assert whole.generated_text != client.generate(PROMPT, max_new_tokens=8).generated_text
    events = list(client.generate_stream(PROMPT, adapter_id="sql", max_new_tokens=8))
    assert "".join(e.token.text for e in events if not e.token.special) == whole.generated_text
    assert events[-1].details.prompt_tokens == whole.details.prompt_tokens
    alternatives = client.generate(PROMPT, adapter_id="sql", max_new_tokens=4, return_k_alternatives=2)
    for token in alternatives.details.tokens:
        if not token.special:
            assert [a.id for a in token.alternative_tokens][0] == token.id and len(token.alternative_tokens) == 2
    # the folder an adapter was registered from names it, with LoRAX's adapter_source "local"
    local = client.generate(PROMPT, adapter_id=str(folder), adapter_source="local", max_new_tokens=8)
    assert local.generated_text == whole.generated_text
    with pytest.raises(ValidationError, match="adapter_source"):
        client.generate(PROMPT, adapter_id="sql", adapter_source="s3", max_new_tokens=2)


@pytest.mark.parametrize("parameters,field", [
    ({"watermark": True}, "watermark"),
    ({"typical_p": 0}, "typical_p"),
    ({"decoder_input_details": True}, "decoder_input_details"),                # needs details (a stream: none)
    ({"best_of": 2}, "best_of"),                                   # needs sampling
    ({"best_of": 5, "do_sample": True}, "best_of"),                 # over the limit
    ({"best_of": 2, "do_sample": True, "seed": 1}, "seed"),         # one seed cannot seed several sequences
    ({"grammar": {"type": "lark", "value": "start: /a/"}}, "parameters.grammar.type"),   # json, regex, json_schema
    ({"response_format": {"type": "text"}}, "parameters.response_format.type"),           # json_object only
    ({"merged_adapters": {"ids": ["sql", "from-folder"], "weights": [0.5, 0.5]}, "adapter_id": "sql"},
     "merged_adapters"),                                          # exclusive, as in LoRAX
    ({"merged_adapters": {"ids": ["sql", "from-folder"], "weights": [0.5]}}, "merged_adapters.weights"),
    ({"api_token": "hf_x"}, "api_token"),
    ({"adapter_id": "sql", "adapter_source": "pbase"}, "adapter_source"),
    ({"top_n_tokens": 2}, "top_n_tokens"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_refused_fields_are_422_naming_them(server, parameters, field):
    r = generate(server, max_new_tokens=2, **parameters)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"] and r.json()["error_type"] == "validation"       # TGI's shape
    if field == "top_n_tokens":                     # a stream has no details to need: it is served there
        return
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **parameters}}
    assert httpx.post(f"{server.url}/generate_stream", json=body, timeout=T).status_code == 422


def test_truncate_ignore_eos_headers_and_defaults_that_ask_for_nothing(server, loaded):
    r = generate(server, max_new_tokens=2, details=True, truncate=2)
    assert r.status_code == 200 and r.json()["details"]["prompt_tokens"] == 2
    r = generate(server, max_new_tokens=3, adapter_id="sql", details=True)          # LoRAX's headers
    generated = r.json()["details"]["generated_tokens"]
    assert (r.headers["x-model-id"], r.headers["x-adapter-id"]) == (loaded.name, "sql")
    assert (int(r.headers["x-prompt-tokens"]), int(r.headers["x-generated-tokens"]), int(r.headers["x-total-tokens"])
            ) == (len(loaded.tokenizer.encode(PROMPT)), generated, len(loaded.tokenizer.encode(PROMPT)) + generated)
    long = {"inputs": "word " * 600, "parameters": {"max_new_tokens": 2, "details": True}}
    assert httpx.post(f"{server.url}/generate", json=long, timeout=T).status_code == 400
    long["parameters"]["truncate"] = 8                     # TGI keeps the input's last tokens
    r = httpx.post(f"{server.url}/generate", json=long, timeout=T)
    assert r.status_code == 200 and r.json()["details"]["prompt_tokens"] == 8
    r = generate(server, max_new_tokens=12, details=True, ignore_eos_token=True)
    assert r.json()["details"]["generated_tokens"] == 12 and r.json()["details"]["finish_reason"] == "length"
    # what the clients send when a feature is off
    off = {"watermark": False, "typical_p": None, "decoder_input_details": False, "best_of": 1, "grammar": None,
           "merged_adapters": None, "api_token": None, "adapter_source": None, "top_n_tokens": None,
           "return_k_alternatives": None, "response_format": None, "stop": [], "repetition_penalty": None}
    assert generate(server, max_new_tokens=2, **off).status_code == 200


def test_frequency_penalty_is_tgis_own_on_these_routes():
    """TGI counts a token over the prompt and the generated tokens, divided by their number (its
    `HeterogeneousFrequencyPenaltyLogitsProcessor`); the OpenAI routes keep OpenAI's count over the output."""
    from service.api.tgi_params import Parameters, sampling

    params, _ = sampling(Parameters(frequency_penalty=0.5), Settings(), stream=False)
    assert params.frequency_penalty == 0.5 and params.frequency_over_context


def test_the_weight_format_served_is_reported(server, loaded):
    """`/info`'s `model_dtype` is the compute dtype; what the weights are served as is in `weight_format` /
    `weight_types` there, in `/stats` and in `adapter_serve_model_info`."""
    info = httpx.get(f"{server.url}/info", timeout=T).json()
    kinds = {w.format for w in loaded.stored.values()}
    expected = "gguf" if loaded.stored else "dense"
    assert info["weight_format"] == expected and info["model_dtype"] == "torch.float32"
    assert kinds <= set(info["weight_types"]) and sum(info["weight_types"].values()) == (
        len(loaded.stored) + len(loaded.state_dict))
    assert httpx.get(f"{server.url}/stats", timeout=T).json()["weights"]["weight_format"] == expected
    metrics = httpx.get(f"{server.url}/metrics", timeout=T).text
    labels = f'device="cpu",dtype="float32",model="{loaded.name}",weight_format="{expected}"'
    assert f"adapter_serve_model_info{{{labels}}} 1.0" in metrics
