"""Structured output end to end through a real uvicorn server on the embedded SmolLM2 with a random LoRA adapter,
with the real, unmodified clients from PyPI: `openai` (`response_format` json_schema / json_object, vLLM's
`guided_choice`, `guided_regex`, `structured_outputs` through `extra_body`, streaming and not), `text-generation`
and `huggingface_hub.InferenceClient` (TGI's `grammar`), `lorax-client` (LoRAX's `response_format`). Every answer
parses and validates against its schema with `jsonschema`, in the schema's property order; 50 sampled answers at
temperature 1 on the adapter included. Bad schemas are 400s naming the field; constrained and free requests share
the engine's batch without changing the free ones' tokens."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from _server import LiveServer
from lora_folders import save_random_lora_of
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.slow
T = 120
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "hobbies", "student"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    folder = save_random_lora_of(loaded, tmp_path_factory.mktemp("adapters") / "tuned", "tuned", seed=3)
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=16,
                        max_seq_len=512, max_prompt_tokens=256, max_tokens_limit=160)
    with LiveServer(create_app(settings, loaded)) as live:
        r = httpx.put(f"{live.url}/admin/adapters/tuned", json={"source": "local", "path": str(folder)}, timeout=T)
        assert r.status_code == 201, r.text
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=T)


def person_format(schema=PERSON) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def assert_valid(text: str, schema: dict = PERSON) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert list(value) == [k for k in schema["properties"] if k in value]          # the schema's order
    return value


def test_json_schema_on_an_adapter_50_times_at_temperature_1_always_validates(client):
    def ask(i: int):
        return client.chat.completions.create(model="tuned", messages=ASK, response_format=person_format(),
                                              temperature=1.0, seed=i, max_tokens=160)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(50)))
    values = []
    for answer in answers:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice
        values.append(assert_valid(choice.message.content))
    assert len({json.dumps(v) for v in values}) > 10                  # sampled: not one answer 50 times


def test_json_schema_streamed_and_json_object_on_the_base_model(client, loaded):
    chunks = client.chat.completions.create(model=loaded.name, messages=ASK, response_format=person_format(),
                                            temperature=0, max_tokens=160, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=loaded.name, messages=ASK, response_format=person_format(),
                                           temperature=0, max_tokens=160)
    assert streamed == whole.choices[0].message.content
    assert_valid(streamed)
    anything = client.chat.completions.create(model="tuned", messages=ASK, response_format={"type": "json_object"},
                                              temperature=0.8, seed=1, max_tokens=160)
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:                                      # cut by max_tokens: still an object's beginning
        assert anything.choices[0].finish_reason == "length"
        assert anything.choices[0].message.content.startswith("{")


def test_vllm_guided_choice_regex_and_structured_outputs(client, loaded):
    choices = ["positive", "negative", "neutral"]
    out = client.completions.create(model="tuned", prompt="I loved this film. Sentiment:", max_tokens=8, n=4,
                                    temperature=1.0, seed=0, extra_body={"guided_choice": choices})
    assert all(c.text in choices and c.finish_reason == "stop" for c in out.choices)
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    out = client.completions.create(model=loaded.name, prompt="Today's date is", max_tokens=16, temperature=1.0,
                                    seed=2, extra_body={"guided_regex": date})
    assert re.fullmatch(date, out.choices[0].text) and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model="tuned", prompt="A person as JSON:", max_tokens=160, temperature=0,
                                    extra_body={"response_format": person_format()})     # vLLM: on completions too
    assert out.choices[0].finish_reason == "stop"
    assert_valid(out.choices[0].text)
    chat = client.chat.completions.create(model="tuned", messages=ASK, max_tokens=160, temperature=0.7, seed=4,
                                          extra_body={"structured_outputs": {"json": PERSON}})
    assert_valid(chat.choices[0].message.content)
    pick = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "Yes or no?"}],
                                          max_tokens=4, temperature=0,
                                          extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert pick.choices[0].message.content in ("yes", "no")


def test_tgi_grammar_with_text_generation_and_huggingface_hub_and_lorax_response_format(server, monkeypatch):
    from huggingface_hub import InferenceClient, constants
    from lorax import Client as LoraxClient
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    out = Client(server.url, timeout=T).generate("A person as JSON:", max_new_tokens=160, do_sample=True, seed=5,
                                                 grammar=Grammar(type=GrammarType.Json, value=PERSON))
    assert out.details.finish_reason == "eos_token"
    assert_valid(out.generated_text)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")            # the suite's offline mode also blocks loopback
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hf = InferenceClient(base_url=server.url)
    code = r"[A-Z]{3}-[0-9]{4}"
    text = hf.text_generation("A product code:", max_new_tokens=16, grammar={"type": "regex", "value": code},
                              adapter_id="tuned")
    assert re.fullmatch(code, text)
    lorax = LoraxClient(server.url, timeout=T).generate(
        "A person as JSON:", max_new_tokens=160, adapter_id="tuned", temperature=0.9, seed=6,
        response_format={"type": "json_object", "schema": PERSON})
    assert_valid(lorax.generated_text)


@pytest.mark.parametrize("path,extra,named", [
    ("chat", {"response_format": person_format({"type": "object", "properties": {"a": {"type": "strng"}}})},
     "response_format.json_schema.schema: invalid or unsupported JSON schema: Invalid type: strng"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format.json_schema: required"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "a person", "schema": PERSON}}},
     "response_format.json_schema.name: 'a person' is not a schema name"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "p" * 65, "schema": PERSON}}},
     "response_format.json_schema.name: "),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": "yes",
                                                                        "schema": PERSON}}},
     "response_format.json_schema.strict: must be true or false"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"description": 3, "schema": PERSON}}},
     "response_format.json_schema.description: must be a string"),
    ("chat", {"response_format": person_format({"type": "object", "if": {"required": ["a"]}})},
     "response_format.json_schema.schema: invalid or unsupported JSON schema: Unimplemented keys"),
    ("completions", {"guided_regex": "[a-"}, "guided_regex: invalid or unsupported regular expression"),
    ("completions", {"guided_json": "{not json"}, "guided_json: not valid JSON"),
    ("completions", {"guided_json": '{"a": ' * 200 + "1" + "}" * 200}, "guided_json: the JSON nests 200 levels"),
    ("completions", {"guided_choice": []}, "guided_choice: must be a non-empty list"),
    ("completions", {"guided_grammar": "start: undefined_rule"}, "guided_grammar: invalid or unsupported grammar"),
    ("completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex and guided_choice"),
    ("completions", {"guided_regex": "a", "ignore_eos": True}, "ignore_eos: cannot be combined"),
    ("tgi", {"grammar": {"type": "json", "value": {"type": "object", "properties": {"a": {"minimum": "x"}}}}},
     "parameters.grammar.value: invalid or unsupported JSON schema"),
    ("tgi", {"grammar": {"type": "regex", "value": "("}}, "parameters.grammar.value: invalid"),
    ("completions", {"guided_grammar": "start: start"}, "guided_grammar: invalid or unsupported grammar: no text "
                                                         "matches it"),
    ("completions", {"guided_regex": "x\\"}, "guided_regex: the regular expression ends with a lone backslash"),
    # these compile, and llguidance's limits stop them at the first token: the same 400, every time
    ("completions", {"guided_regex": "b{999999}"}, "guided_regex: the grammar failed during generation"),
    ("completions", {"guided_regex": "b{999999}"}, "guided_regex: the grammar failed during generation"),
    ("chat", {"guided_choice": [f"opt{i}" for i in range(3000)]}, "guided_choice: the grammar failed during"),
    ("tgi", {"grammar": {"type": "regex", "value": "c{999999}"}}, "parameters.grammar.value: the grammar failed"),
])
def test_bad_schemas_and_grammars_are_400_naming_the_field(server, loaded, path, extra, named):
    if path == "tgi":
        r = httpx.post(f"{server.url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 4, **extra}},
                       timeout=T)
    else:
        body = ({"messages": ASK} if path == "chat" else {"prompt": "x"})
        r = httpx.post(f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}",
                       json={"model": loaded.name, "max_tokens": 4, **body, **extra}, timeout=T)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert named in (error if path == "tgi" else error["message"]), r.text         # TGI's shape on its route


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_streamed_grammar_failing_as_it_runs_raises_the_clients_api_error(client, loaded, route):
    """Streamed, the failure ends the stream with vLLM's error event (`{"error": {...}}`, then `[DONE]`), which
    the openai client raises as `APIError` with the message, instead of a chunk whose finish reason it does not
    know; the next request is served."""
    with pytest.raises(openai.APIError, match="guided_regex: the grammar failed during generation") as caught:
        if route == "chat":
            stream = client.chat.completions.create(model=loaded.name, messages=ASK, max_tokens=4, stream=True,
                                                    extra_body={"guided_regex": "b{999999}"})
        else:
            stream = client.completions.create(model=loaded.name, prompt="x", max_tokens=4, stream=True,
                                               extra_body={"guided_regex": "b{999999}"})
        list(stream)
    assert caught.value.body["code"] == 400 and caught.value.body["type"] == "invalid_request_error"
    again = client.completions.create(model=loaded.name, prompt="x", max_tokens=2, temperature=0)
    assert again.choices[0].finish_reason == "length"


def test_unknown_structured_output_options_are_422_naming_them(server, loaded):
    r = httpx.post(f"{server.url}/v1/completions", timeout=T, json={
        "model": loaded.name, "prompt": "x", "max_tokens": 2,
        "structured_outputs": {"regex": "a+", "whitespace_pattern": " *"}})
    assert r.status_code == 422 and "structured_outputs.whitespace_pattern" in r.json()["error"]["message"], r.text


def test_constrained_and_free_requests_share_the_batch_without_changing_the_free_ones(client, loaded):
    def free(model: str) -> str:
        return client.completions.create(model=model, prompt="The capital of France is", max_tokens=24,
                                         temperature=0).choices[0].text
    alone = [free("tuned"), free(loaded.name)]

    def constrained(i: int):
        return client.chat.completions.create(model=["tuned", loaded.name][i % 2], messages=ASK, temperature=1.0,
                                              seed=i, max_tokens=160, response_format=person_format())
    with ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(constrained, i) for i in range(6)]
        mixed = [pool.submit(free, "tuned"), pool.submit(free, loaded.name)]
        answers = [f.result() for f in busy]
        assert [f.result() for f in mixed] == alone
    for answer in answers:
        assert_valid(answer.choices[0].message.content)
