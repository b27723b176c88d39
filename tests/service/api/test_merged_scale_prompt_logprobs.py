"""LoRAX's `merged_adapters`, `adapter_scale` and prompt log-probabilities end to end through a real uvicorn
server on the embedded model, with the real, unmodified clients from PyPI: `lorax-client` (`generate`,
`generate_stream` with `merged_adapters` and `adapter_id`), `text-generation` (`decoder_input_details`) and
`openai` (`adapter_scale` through `extra_body`, `echo` with `logprobs`, streaming and not). A merged adapter is
built once per spec and shares the batch like any adapter; a bad spec is a 4xx naming the field and changes
nothing; the prompt log-probabilities agree across the TGI and OpenAI routes."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from lora_folders import save_random_lora_of
from _server import LiveServer
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.slow

T = 120
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def app_and_server(loaded, tmp_path_factory):
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=8,
                        max_seq_len=512, max_prompt_tokens=400, max_tokens_limit=64, max_merged_adapters=2)
    app = create_app(settings, loaded)
    folders = tmp_path_factory.mktemp("adapters")
    with LiveServer(app) as live:
        for seed, name in enumerate(("sql", "chat", "poem"), start=1):
            folder = save_random_lora_of(loaded, folders / name, name, seed=seed)
            files = {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
            r = httpx.post(f"{live.url}/admin/adapters", data={"name": name}, files=files, timeout=T)
            assert r.status_code == 201, r.text
        yield app, live


@pytest.fixture(scope="module")
def server(app_and_server):
    return app_and_server[1]


@pytest.fixture(scope="module")
def registry(app_and_server):
    return app_and_server[0].state.serving.registry


def tgi(server, **parameters) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8,
                                                                                          **parameters}}, timeout=T)


def test_lorax_client_merged_adapters_share_the_batch_and_are_cached(server, registry):
    from lorax import AsyncClient, Client
    from lorax.types import MergedAdapters

    def logprobs(response):
        return [t.logprob for t in response.details.tokens]

    client = Client(server.url, timeout=T)
    sql_out = client.generate(PROMPT, adapter_id="sql", max_new_tokens=8)
    chat_out = client.generate(PROMPT, adapter_id="chat", max_new_tokens=8)
    sql = sql_out.generated_text
    # one adapter at weight 1 is that adapter (PEFT's linear merge of one: the same delta, scaling folded)
    alone = MergedAdapters(ids=["sql"], weights=[1.0], merge_strategy="linear", density=1.0)
    assert client.generate(PROMPT, merged_adapters=alone, max_new_tokens=8).generated_text == sql
    mix = MergedAdapters(ids=["sql", "chat"], weights=[0.7, 0.6], merge_strategy="linear", density=1.0)
    whole = client.generate(PROMPT, merged_adapters=mix, max_new_tokens=8)
    assert whole.details.generated_tokens == 8
    assert logprobs(whole) not in (logprobs(sql_out), logprobs(chat_out))      # neither source alone
    events = list(client.generate_stream(PROMPT, merged_adapters=mix, max_new_tokens=8))
    assert "".join(e.token.text for e in events if not e.token.special) == whole.generated_text
    ties = MergedAdapters(ids=["sql", "chat"], weights=[0.7, 0.6], merge_strategy="ties", density=0.5,
                          majority_sign_method="total")
    tied = client.generate(PROMPT, merged_adapters=ties, max_new_tokens=8).generated_text
    merged = list(registry._merged.values())
    assert len(merged) == 2 and {r.source["merge_strategy"] for r in merged} == {"linear", "ties"}
    assert client.generate(PROMPT, merged_adapters=mix, max_new_tokens=8).generated_text == whole.generated_text

    async def together():                     # merged, plain and base requests in one batch
        aclient = AsyncClient(server.url, timeout=T)
        return await asyncio.gather(aclient.generate(PROMPT, merged_adapters=mix, max_new_tokens=8),
                                    aclient.generate(PROMPT, adapter_id="sql", max_new_tokens=8),
                                    aclient.generate(PROMPT, merged_adapters=ties, max_new_tokens=8),
                                    aclient.generate(PROMPT, max_new_tokens=8))
    outs = asyncio.run(together())
    assert [o.generated_text for o in outs[:3]] == [whole.generated_text, sql, tied]
    assert len(registry._merged) == 2                                    # served from the cache: no new merge
    # a third spec evicts the least recently used idle one (max_merged_adapters=2)
    third = MergedAdapters(ids=["chat", "poem"], weights=[0.5, 0.5], merge_strategy="linear", density=1.0)
    client.generate(PROMPT, merged_adapters=third, max_new_tokens=2)
    assert len(registry._merged) == 2
    assert tgi(server, merged_adapters={"ids": ["sql", "chat"], "weights": [0.7, 0.6]}).json()["generated_text"] \
        == whole.generated_text                                           # merged again, the same adapter


@pytest.mark.parametrize("spec,status,named", [
    ({"ids": ["sql", "nope"], "weights": [0.5, 0.5]}, 404, "merged_adapters.ids[1]"),
    ({"ids": ["sql", "chat"], "weights": [0.5]}, 422, "merged_adapters.weights"),
    ({"ids": ["sql", "chat"], "weights": [0.5, "NaN"]}, 422, "merged_adapters"),
    ({"ids": ["sql", "chat"], "weights": [0.5, 0.5], "merge_strategy": "svd"}, 422, "merged_adapters.merge_strategy"),
    ({"ids": ["sql", "chat"], "weights": [0.5, 0.5], "merge_strategy": "ties"}, 422, "merged_adapters.density"),
    ({"ids": ["sql", "chat"], "weights": [0.5, 0.5], "merge_strategy": "ties", "density": 0.5,
      "majority_sign_method": "median"}, 422, "majority_sign_method"),
    ({"ids": ["sql", "sql"], "weights": [0.5, 0.5]}, 422, "merged_adapters.ids"),
    ({"ids": [], "weights": []}, 422, "merged_adapters"),
    ({"ids": ["sql"], "weights": [1.0], "extra": 1}, 422, "extra"),
])
def test_bad_merge_specs_are_refused_naming_the_field_and_change_nothing(server, registry, spec, status, named):
    before = tgi(server, adapter_id="sql").json()["generated_text"]
    listed = httpx.get(f"{server.url}/admin/adapters", timeout=T).json()
    merged = dict(registry._merged)
    r = tgi(server, merged_adapters=spec)
    assert r.status_code == status and named in r.json()["error"], r.text              # TGI's shape: a string
    assert dict(registry._merged) == merged
    assert httpx.get(f"{server.url}/admin/adapters", timeout=T).json() == listed
    assert tgi(server, adapter_id="sql").json()["generated_text"] == before


def test_adapter_scale_openai_and_tgi(server, loaded):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    def complete(model, **extra):
        choice = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                           extra_body=extra or None).choices[0]
        return choice.text, choice.logprobs.token_logprobs
    base, sql = complete(loaded.name), complete("sql")
    assert sql[1] != base[1]
    assert complete("sql", adapter_scale=1.0) == sql                     # the same bits as no scale
    assert complete("sql", adapter_scale=0.0) == base                    # scale 0: the base model, exactly
    half = complete("sql", adapter_scale=0.5)
    assert half[1] not in (base[1], sql[1])
    chat = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                          temperature=0, extra_body={"adapter_scale": 0.0})
    plain = client.chat.completions.create(model=loaded.name, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="adapter_scale"):
        complete("sql", adapter_scale=50)
    assert tgi(server, adapter_id="sql", adapter_scale=0.5).json()["generated_text"] == half[0]
    merged = {"ids": ["sql", "chat"], "weights": [0.7, 0.6]}
    assert tgi(server, merged_adapters=merged, adapter_scale=0.0).json()["generated_text"] == \
        tgi(server).json()["generated_text"]
    r = tgi(server, adapter_scale=0.5)
    assert r.status_code == 400 and "adapter_scale" in r.json()["error"] and r.json()["error_type"] == "validation"


@pytest.mark.parametrize("model", ["base", "sql"])
def test_prompt_logprobs_text_generation_and_openai_echo(server, loaded, model):
    import lorax
    import text_generation

    name = loaded.name if model == "base" else model
    ids = loaded.tokenizer.encode(PROMPT)
    if model == "base":                               # TGI's client; LoRAX's for an adapter (TGI's has no adapter_id)
        details = text_generation.Client(server.url, timeout=T).generate(PROMPT, max_new_tokens=4,
                                                                         decoder_input_details=True).details
    else:
        details = lorax.Client(server.url, timeout=T).generate(PROMPT, adapter_id=model, max_new_tokens=4,
                                                               decoder_input_details=True).details
    prefill = details.prefill
    assert [t.id for t in prefill] == ids and prefill[0].logprob is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in prefill[1:])
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    n = len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == n + 4
    assert lp.tokens[:n] == [loaded.tokenizer.decode([i], False) for i in ids]
    assert lp.token_logprobs[1:n] == pytest.approx([t.logprob for t in prefill[1:]], abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset[n] == len(PROMPT) and out.choices[0].text.startswith(PROMPT)
    chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6) and streamed[0] is None
    plain = client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    assert len(plain.choices[0].logprobs.tokens) == 4                      # no echo: no prompt tokens
