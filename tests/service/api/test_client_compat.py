"""What the clients users already have send, through a real uvicorn server (a black-box probe's findings, RELIABILITY.md
"Clients, round 4"): explicit nulls for OpenAI's nullable fields, no `model` (vLLM's base model) and TGI clients'
placeholders, `models.retrieve`, `tool_choice: "none"` beside tools on a template without them,
`parallel_tool_calls` and `chat_template_kwargs`, TGI's and LoRAX's `response_format` shapes (huggingface_hub's
InferenceClient rewrites a json_schema into one), TGI's error body (a string its clients raise with), and TGI's
per-token texts next to a stop sequence."""

import json

import httpx
import jsonschema
import openai
import pytest

from test_openai_depth import PROMPT, client, server  # noqa: F401  (the same server: the base model and "tuned")

pytestmark = pytest.mark.slow
T = 60
HELLO = [{"role": "user", "content": "Say hello."}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def inference_client(server, monkeypatch):
    """huggingface_hub's InferenceClient on this server: the suite's offline mode would refuse even 127.0.0.1."""
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.utils import close_session
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    # a fresh pooled session: the library's shared one may hold a keep-alive connection that the server's
    # 5 s keep-alive timeout is closing (httpx's expiry is 5 s too); one full-suite run waited out its 60 s there
    close_session()
    return InferenceClient(base_url=server.url, timeout=T)


def chat(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 6, **body}, timeout=T)


def test_explicit_nulls_mean_the_defaults(client, loaded):
    nulls = {"temperature": None, "top_p": None, "n": None, "presence_penalty": None, "frequency_penalty": None,
             "stream": None, "min_tokens": None}
    same = client.chat.completions.create(model="tuned", messages=HELLO, max_tokens=6, seed=3, extra_body=nulls)
    plain = client.chat.completions.create(model="tuned", messages=HELLO, max_tokens=6, seed=3)
    assert same.choices[0].message.content == plain.choices[0].message.content and len(same.choices) == 1
    text = client.completions.create(model=loaded.name, prompt="Hi", max_tokens=4, seed=3,
                                     extra_body={"temperature": None, "echo": None, "n": None})
    assert text.choices[0].text == client.completions.create(model=loaded.name, prompt="Hi", max_tokens=4,
                                                             seed=3).choices[0].text
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):     # a required field stays required
        client.chat.completions.create(model="tuned", messages=None, max_tokens=2)


def test_no_model_and_tgi_placeholders_are_the_base_model(server, loaded, monkeypatch):
    base = chat(server, model=loaded.name, temperature=0).json()["choices"][0]["message"]["content"]
    for extra in ({}, {"model": None}, {"model": "tgi"}, {"model": "dummy"}):
        r = chat(server, temperature=0, **extra)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == base, (extra, r.text)
    assert chat(server, model="nope").status_code == 404
    out = inference_client(server, monkeypatch).chat_completion(HELLO, max_tokens=6, temperature=0)
    assert out.choices[0].message.content == base


def test_models_retrieve(client, loaded):
    base, tuned = client.models.retrieve(loaded.name), client.models.retrieve("tuned")
    assert base.id == loaded.name and tuned.id == "tuned" and tuned.parent == loaded.name
    assert tuned.max_model_len == 384
    assert [m.id for m in client.models.list()] == [loaded.name, "tuned"]
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.models.retrieve("nope")


def test_tool_choice_none_passes_no_tools_so_nothing_to_refuse(server, loaded):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert chat(server, model=loaded.name, tools=tools, tool_choice="none").status_code == 200
    r = chat(server, model=loaded.name, tools=tools)
    assert r.status_code == 400 and "does not support tools" in r.text          # SmolLM2's template has none


def test_parallel_tool_calls_and_chat_template_kwargs_are_taken(server, loaded):
    assert chat(server, model=loaded.name, parallel_tool_calls=False).status_code == 200
    r = chat(server, model=loaded.name, temperature=0, chat_template_kwargs={"enable_thinking": False})
    assert r.status_code == 200, r.text
    r = chat(server, model=loaded.name, chat_template_kwargs={"messages": []})
    assert r.status_code == 400 and "chat_template_kwargs.'messages'" in r.json()["error"]["message"]


@pytest.mark.parametrize("fmt", [
    {"type": "json_object", "value": SCHEMA},                   # TGI's chat route, huggingface_hub's rewrite
    {"type": "json_object", "schema": SCHEMA},                  # LoRAX's
    {"type": "json", "value": SCHEMA},                          # TGI's grammar type
])
def test_tgi_and_lorax_response_formats_constrain_the_output(server, loaded, fmt):
    r = chat(server, model="tuned", max_tokens=40, temperature=0.7, seed=1, response_format=fmt)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)


def test_tgi_regex_response_format_and_huggingface_hub_json_schema(server, monkeypatch):
    r = chat(server, model="tuned", temperature=1.0, seed=2, response_format={"type": "regex", "value": "[0-9]{3}"})
    assert r.status_code == 200 and len(r.json()["choices"][0]["message"]["content"]) == 3, r.text
    assert r.json()["choices"][0]["message"]["content"].isdigit()
    out = inference_client(server, monkeypatch).chat_completion(
        HELLO, model="tuned", max_tokens=40, seed=3, temperature=0.7,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    r = chat(server, model="tuned", response_format={"type": "json_object", "value": SCHEMA, "schema": SCHEMA})
    assert r.status_code == 400 and "not both" in r.text


def test_tgi_clients_raise_their_errors_with_the_message(server):
    import lorax
    import text_generation
    from text_generation.errors import ValidationError
    with pytest.raises(ValidationError) as caught:
        text_generation.Client(server.url, timeout=T).generate("x", max_new_tokens=10**6)
    assert "max_new_tokens" in str(caught.value) and "{" not in str(caught.value)       # the message, not a dict
    with pytest.raises(lorax.errors.NotFoundError) as missing:
        lorax.Client(server.url, timeout=T).generate("x", max_new_tokens=2, adapter_id="nope")
    assert "nope" in str(missing.value) and "{" not in str(missing.value)
    r = httpx.post(f"{server.url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, timeout=T)
    body = r.json()
    assert r.status_code == 400 and body["error_type"] == "validation" and body["request_id"] == r.headers["x-request-id"]


def test_tgi_tokens_keep_their_own_text_next_to_a_stop_sequence(server, loaded):
    """A token that might start a stop sequence is held back from the text, not from its own entry: each
    token's text is its own (TGI's), and they join to the decoded ids."""
    import text_generation
    client = text_generation.Client(server.url, timeout=T)
    free = client.generate("The capital of France is", max_new_tokens=12)
    texts = [t.text for t in free.details.tokens]
    stop = "".join(texts[2:4])                            # two tokens' text: the first of them may start it
    cut = client.generate("The capital of France is", max_new_tokens=12, stop_sequences=[stop])
    ids = [t.id for t in cut.details.tokens]
    assert [t.text for t in cut.details.tokens] == texts[:len(ids)]
    assert "".join(t.text for t in cut.details.tokens) == loaded.tokenizer.decode(ids)
    streamed = [r.token.text for r in client.generate_stream("The capital of France is", max_new_tokens=12,
                                                              stop_sequences=[stop])]
    assert streamed == texts[:len(ids)]


def test_echo_without_generation_scores_the_prompt(client, loaded):
    """vLLM's `max_tokens: 0` with `echo`: the prompt back with its log-probabilities, nothing generated."""
    prompt = "The three primary colours are"
    out = client.completions.create(model="tuned", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == prompt and out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == out.usage.prompt_tokens and choice.logprobs.token_logprobs[0] is None
    one = client.completions.create(model="tuned", prompt=prompt, max_tokens=1, echo=True, logprobs=1).choices[0]
    assert choice.logprobs.token_logprobs == one.logprobs.token_logprobs[:-1]     # the same prompt scores
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0"):
        client.completions.create(model="tuned", prompt=prompt, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0"):
        list(client.completions.create(model="tuned", prompt=prompt, max_tokens=0, echo=True, stream=True))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_names_the_stop_string_or_token_id_as_vllm_does(client, loaded, stream):
    """vLLM's `stop_reason`: the stop string or `stop_token_ids` id that ended a choice; null when it ran to its
    length or ended at the model's EOS (checked before `stop_token_ids`, as vLLM does). Streams carry it on a
    choice's last chunk only."""
    greedy = dict(model=loaded.name, prompt=PROMPT, max_tokens=12, temperature=0)
    text = client.completions.create(**greedy).choices[0].text
    words, ids = text.split(), loaded.tokenizer.encode(text, False)      # greedy, so these come again
    eos = loaded.tokenizer.eos_token_id

    def ended(**kw) -> tuple[str, object]:
        if not stream:
            choice = client.completions.create(**{**greedy, **kw}).choices[0]
            return choice.finish_reason, choice.model_extra["stop_reason"]
        last = [c.choices[0] for c in client.completions.create(**{**greedy, **kw}, stream=True) if c.choices]
        assert all("stop_reason" not in c.model_extra for c in last[:-1]), last
        return last[-1].finish_reason, last[-1].model_extra["stop_reason"]

    assert ended() == ("length", None)
    assert ended(stop=["zzqx", words[2]]) == ("stop", words[2])                  # the one that matched
    assert ended(extra_body={"stop_token_ids": [ids[3]]}) == ("stop", ids[3])
    forced = {"logit_bias": {str(eos): 100}}
    assert ended(**forced) == ("stop", None)                                      # the EOS
    assert ended(**forced, extra_body={"stop_token_ids": [eos]}) == ("stop", None)
    assert ended(**forced, extra_body={"stop_token_ids": [eos], "ignore_eos": True}) == ("stop", eos)
    if not stream:
        chat = client.chat.completions.create(model="tuned", messages=HELLO, max_tokens=8, temperature=0,
                                              stop=["zzqx"]).choices[0]
        text = chat.message.content
        stopped = client.chat.completions.create(model="tuned", messages=HELLO, max_tokens=8, temperature=0,
                                                 stop=[text.split()[1]]).choices[0]
        assert (chat.model_extra["stop_reason"], stopped.model_extra["stop_reason"]) == (None, text.split()[1])
    else:
        chunks = [c for c in client.chat.completions.create(model="tuned", messages=HELLO, max_tokens=8,
                                                            temperature=0, stream=True) if c.choices]
        assert chunks[-1].choices[0].model_extra["stop_reason"] is None and \
            all("stop_reason" not in c.choices[0].model_extra for c in chunks[:-1])


def test_continue_final_message_and_chat_echo_as_vllm(server, client, loaded):
    """vLLM's `continue_final_message` (the prompt ends inside the last message: an assistant answer the caller
    started is continued) and chat `echo` (that message's content begins the answer): the continuation is the
    completions route's greedy text on the same token ids (from `/tokenize`, which takes the field too)."""
    started = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is"}]
    body = {"model": "tuned", "messages": started, "max_tokens": 6, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=T)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": started, "add_generation_prompt": False,
                                                      "continue_final_message": True}, timeout=T).json()["tokens"]
    assert loaded.tokenizer.decode(ids, False).endswith("The capital of France is")
    same = client.completions.create(model="tuned", prompt=ids, max_tokens=6, temperature=0).choices[0].text
    assert message == {"role": "assistant", "content": same}
    echoed = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "echo": True}, timeout=T).json()
    assert echoed["choices"][0]["message"]["content"] == "The capital of France is" + same
    chunks = client.chat.completions.create(model="tuned", messages=started, max_tokens=6, temperature=0,
                                            stream=True, extra_body={"add_generation_prompt": False,
                                                                     "continue_final_message": True, "echo": True})
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents[0] == "The capital of France is" and "".join(contents[1:]) == same
    # a new assistant turn: echo has no assistant message to repeat; the user's last message is not repeated
    asked = client.chat.completions.create(model="tuned", messages=started[:1], max_tokens=6, temperature=0,
                                           extra_body={"echo": True}).choices[0].message.content
    assert asked == client.chat.completions.create(model="tuned", messages=started[:1], max_tokens=6,
                                                   temperature=0).choices[0].message.content
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "add_generation_prompt": True}, timeout=T)
    assert r.status_code == 400 and "continue_final_message" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "x", "continue_final_message": True}, timeout=T)
    assert r.status_code == 400 and "only with messages" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_return_tokens_as_token_ids_names_tokens_by_id(server, client, loaded, stream):
    """vLLM's `return_tokens_as_token_ids`: logprobs name each token `token_id:<id>` (the sampled one and the top
    ones, chat and completions); the values, `bytes` and `text_offset` (which indexes the choice's text) are
    those of the plain answer; without logprobs it is a 400 naming it."""
    kw = dict(model="tuned", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=not stream)

    def completion(**extra):
        if not stream:
            return client.completions.create(**kw, extra_body=extra).choices[0].logprobs
        parts = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True, extra_body=extra)
                 if c.choices and c.choices[0].logprobs]
        return {key: sum((getattr(p, key) for p in parts), []) for key in ("tokens", "top_logprobs", "text_offset")}

    def get(obj, key):
        return obj[key] if isinstance(obj, dict) else getattr(obj, key)
    plain, named = completion(), completion(return_tokens_as_token_ids=True)
    ids = [int(t.removeprefix("token_id:")) for t in get(named, "tokens")]
    assert all(t.startswith("token_id:") for t in get(named, "tokens"))
    assert [loaded.tokenizer.decode([i], False) for i in ids] == get(plain, "tokens")
    assert get(named, "text_offset") == get(plain, "text_offset")
    for ours, theirs in zip(get(named, "top_logprobs"), get(plain, "top_logprobs")):
        if theirs is None:                               # the echoed prompt's first token
            assert ours is None
            continue
        assert sorted(ours.values()) == sorted(theirs.values()) and all(k.startswith("token_id:") for k in ours)
    chat = dict(model="tuned", messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**chat).choices[0].logprobs.content
    named = client.chat.completions.create(**chat, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    for ours, theirs in zip(named.logprobs.content, plain):
        token_id = int(ours.token.removeprefix("token_id:"))
        assert loaded.tokenizer.decode([token_id], False) == theirs.token and ours.bytes == theirs.bytes
        assert [t.token.startswith("token_id:") for t in ours.top_logprobs] == [True, True]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tuned", "prompt": "Hi", "max_tokens": 2,
                                                          "return_tokens_as_token_ids": True}, timeout=T)
    assert r.status_code == 400 and "return_tokens_as_token_ids" in r.json()["error"]["message"]


def test_store_false_is_taken_and_reasoning_effort_needs_a_template_reading_it(server, client, loaded):
    """OpenAI's `store: false` (nothing is stored here) is taken, `store: true` is a 400; `reasoning_effort`
    reaches templates that read it (test_tools.py) and is a 400 naming it for one that does not (SmolLM2's)."""
    out = client.chat.completions.create(model="tuned", messages=HELLO, max_tokens=2, store=False)
    assert out.choices[0].message.content is not None
    assert client.completions.create(model="tuned", prompt="Hi", max_tokens=2, extra_body={"store": False}).choices
    with pytest.raises(openai.BadRequestError, match="store: completions are not stored"):
        client.chat.completions.create(model="tuned", messages=HELLO, max_tokens=2, store=True)
    with pytest.raises(openai.BadRequestError, match="reasoning_effort: this model's chat template does not read it"):
        client.chat.completions.create(model="tuned", messages=HELLO, max_tokens=2, reasoning_effort="low")

