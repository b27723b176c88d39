"""The OpenAI API in depth through a real uvicorn server with the official `openai` client, streaming and not,
on the base model and an adapter: content parts, `stream_options.include_usage`, `max_completion_tokens`,
`user`, `seed`, chat and completions logprobs in OpenAI's shapes, `n` / `best_of`, lists of prompts, `echo`,
vLLM's sampling extras, `/tokenize` / `/detokenize` / `/version`, and fields refused with a 4xx naming them."""
import time

import httpx
import openai
import pytest

from _server import LiveServer
from lora_folders import save_random_lora
from service.app import create_app
from service.model.decoder import Decoder
from service.settings import Settings

pytestmark = pytest.mark.slow
HELLO = [{"role": "user", "content": "Say hello."}]
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    model = Decoder.from_state_dict(loaded.config, loaded.state_dict)
    folder = save_random_lora(model, tmp_path_factory.mktemp("adapter") / "tuned", "tuned", seed=0, r=8)
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=8,
                        max_seq_len=384, max_prompt_tokens=256, max_tokens_limit=64)
    with LiveServer(create_app(settings, loaded)) as live:
        r = httpx.put(f"{live.url}/admin/adapters/tuned", json={"source": "local", "path": str(folder)}, timeout=60)
        assert r.status_code == 201, r.text
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(params=["base", "tuned"])
def model(request, loaded):
    return loaded.name if request.param == "base" else "tuned"


def chat_text(client, model, stream=False, **kw):
    kw = {"max_tokens": 8, "temperature": 0, **kw}
    if not stream:
        return client.chat.completions.create(model=model, messages=kw.pop("messages", HELLO), **kw).choices[0].message.content
    chunks = client.chat.completions.create(model=model, messages=kw.pop("messages", HELLO), stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_content_parts_are_joined_text_and_other_parts_are_refused(client, model):
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]
    joined = [{"role": "user", "content": "Say\nhello."}]
    assert chat_text(client, model, messages=[{"role": "user", "content": parts}]) == chat_text(client, model, messages=joined)
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[1\].*'image_url'"):
        chat_text(client, model, messages=[{"role": "user", "content": image}])
    with pytest.raises(openai.BadRequestError, match="input_audio"):
        chat_text(client, model, messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])


def test_stream_options_include_usage_ends_with_a_usage_chunk(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=HELLO, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in body)
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    plain = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, stream_options={"include_usage": True})


def test_max_completion_tokens_user_and_seed(client, model):
    out = client.chat.completions.create(model=model, messages=HELLO, max_completion_tokens=3, user="user-42",
                                         temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    again = client.chat.completions.create(model=model, messages=HELLO, max_completion_tokens=3, temperature=1.0,
                                           seed=7, extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == out.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_in_openais_shape(client, model, stream):
    kw = dict(model=model, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    if stream:
        entries, text = [], ""
        for chunk in client.chat.completions.create(stream=True, **kw):
            if chunk.choices and chunk.choices[0].logprobs:
                entries += chunk.choices[0].logprobs.content
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    else:
        out = client.chat.completions.create(**kw)
        entries, text = out.choices[0].logprobs.content, out.choices[0].message.content
        assert out.usage.completion_tokens == len(entries)
    assert entries and "".join(e.token for e in entries).startswith(text[:3])
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token     # greedy: the likeliest
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=model, messages=HELLO, max_tokens=2, top_logprobs=2)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_logprobs_in_openais_shape(client, model, stream):
    kw = dict(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    if stream:
        tokens, token_logprobs, tops, offsets, text = [], [], [], [], ""
        for chunk in client.completions.create(stream=True, **kw):
            lp = chunk.choices[0].logprobs
            text += chunk.choices[0].text
            if lp:
                tokens += lp.tokens
                token_logprobs += lp.token_logprobs
                tops += lp.top_logprobs
                offsets += lp.text_offset
    else:
        choice = client.completions.create(**kw).choices[0]
        lp, text = choice.logprobs, choice.text
        tokens, token_logprobs, tops, offsets = lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    assert len(tokens) == len(token_logprobs) == len(tops) == len(offsets) == 6
    assert "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(6)]
    for token, logprob, top in zip(tokens, token_logprobs, tops):
        assert 1 <= len(top) <= 3 and top[token] == pytest.approx(logprob) and logprob == max(top.values())


def test_n_choices_are_separate_reproducible_sequences(client, model):
    kw = dict(model=model, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    two = client.completions.create(n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 12
    assert [c.text for c in client.completions.create(n=2, **kw).choices] == [c.text for c in two.choices]
    assert client.completions.create(**{**kw, "seed": 12}).choices[0].text == two.choices[1].text
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(n=2, stream=True, **kw):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert [streamed[0], streamed[1]] == [c.text for c in two.choices]
    chat = client.chat.completions.create(model=model, messages=HELLO, max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    best = client.completions.create(best_of=3, **kw)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None and best.usage.completion_tokens == 18


def test_a_list_of_prompts_and_echo(client, model, loaded):
    prompts = [PROMPT, "Water boils at"]
    single = [client.completions.create(model=model, prompt=p, max_tokens=5, temperature=0).choices[0].text
              for p in prompts]
    out = client.completions.create(model=model, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [single[0], single[0], single[1], single[1]]
    ids = [loaded.tokenizer.encode(p) for p in prompts]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == single
    echo = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + single[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, stream=True))
    assert streamed == PROMPT + single[0]


def test_vllm_sampling_extras(client, model, loaded):
    def complete(**extra):
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body=extra).choices[0]
    plain = complete()
    first = loaded.tokenizer.encode(plain.text, add_special_tokens=False)[0]
    forced = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
                                       logit_bias={"1000": 100})
    assert forced.choices[0].logprobs.tokens == [loaded.tokenizer.decode([1000], False)] * 4
    assert complete(repetition_penalty=1.8).text != plain.text or complete(repetition_penalty=5.0).text != plain.text
    stopped = complete(stop_token_ids=[first])
    assert stopped.text == "" and stopped.finish_reason == "stop"
    kept = complete(stop_token_ids=[first], include_stop_str_in_output=True)       # vLLM: the stop token's text too
    assert kept.text == loaded.tokenizer.decode([first], False) != "" and kept.finish_reason == "stop"
    assert complete(min_tokens=8).finish_reason == "length"
    word = plain.text.strip().split()[0]
    assert complete(stop=[word], include_stop_str_in_output=True).text.endswith(word)
    assert word not in complete(stop=[word]).text
    assert word in complete(stop=[word], min_tokens=8).text          # no stop string before min_tokens
    eos = loaded.tokenizer.eos_token
    special = client.completions.create(model=model, prompt=[first], max_tokens=3, temperature=0,
                                        logit_bias={str(loaded.tokenizer.eos_token_id): 100},
                                        extra_body={"skip_special_tokens": False, "ignore_eos": True}).choices[0]
    assert special.text == eos * 3


def test_tokenize_detokenize_version(server, loaded):
    url = server.url
    r = httpx.post(f"{url}/tokenize", json={"model": "tuned", "prompt": PROMPT, "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == loaded.tokenizer.encode(PROMPT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 384 and len(body["token_strs"]) == body["count"]
    chat = httpx.post(f"{url}/tokenize", json={"messages": HELLO}).json()
    assert chat["count"] > body["count"] and chat["token_strs"] is None
    r = httpx.post(f"{url}/tokenize", json={"messages": HELLO, "add_special_tokens": True})
    assert r.status_code == 400 and "add_special_tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": loaded.tokenizer.decode(body["tokens"], False)}
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.get(f"{url}/version").json()["version"]


@pytest.mark.parametrize("route,extra,status,named", [
    ("chat", {"audio": {"voice": "alloy"}}, 422, "audio: not supported by this server"),
    ("chat", {"unknown_field": 1}, 422, "unknown_field"),
    ("chat", {"response_format": {"type": "structural_tag"}}, 400, "response_format.type"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
    ("chat", {"tool_choice": "required"}, 400, "tool_choice"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
    ("completions", {"suffix": "end"}, 400, "suffix"),
    ("completions", {"best_of": 1, "n": 2}, 400, "best_of"),
    ("completions", {"adapter_scale": 0.5}, 400, "adapter_scale"),            # the base model has no adapter
    ("chat", {"adapter_scale": 11}, 400, "adapter_scale"),
    ("completions", {"logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("completions", {"logit_bias": {"1": 101}}, 422, "logit_bias"),
    ("completions", {"logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("completions", {"min_tokens": 50, "max_tokens": 4}, 400, "min_tokens"),
    ("completions", {"n": 17}, 422, "n"),
    ("completions", {"prompt": [[1, 2], [10**30]], "echo": True}, 400, "prompt[1]"),
    ("completions", {"prompt": ["a"] * 40, "n": 2}, 400, "prompt"),
    ("completions", {"stream_options": {"include_usage": True, "other": 1}, "stream": True}, 422, "other"),
])
def test_fields_not_honoured_are_refused_naming_them(server, loaded, route, extra, status, named):
    body = ({"model": loaded.name, "messages": HELLO, "max_tokens": 2} if route == "chat"
            else {"model": loaded.name, "prompt": PROMPT, "max_tokens": 2})
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    r = httpx.post(f"{server.url}{path}", json={**body, **extra}, timeout=60)
    assert r.status_code == status and named in r.json()["error"]["message"], r.text


def test_a_dropped_stream_of_several_choices_frees_every_sequence(server, loaded):
    engine = server.server.config.app.state.serving.engine
    body = {"model": loaded.name, "prompt": [PROMPT, "Water boils at"], "n": 3, "max_tokens": 64, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
        assert engine.num_running + engine.num_waiting == 6
    deadline = time.monotonic() + 10
    while engine.num_running + engine.num_waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running + engine.num_waiting == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_the_eos_that_ends_a_sequence_is_counted_and_listed_as_vllm_does(client, model, loaded, route, stream):
    """A sequence ended by its EOS (forced first here by `logit_bias`): `usage.completion_tokens` counts it and
    `logprobs` lists it with its top tokens, as vLLM's do; its text stays out of the output."""
    eos = loaded.tokenizer.eos_token_id
    kw = dict(model=model, max_tokens=6, temperature=0, logit_bias={str(eos): 100}, extra_body={"min_tokens": 0},
              stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
    if route == "chat":
        out = client.chat.completions.create(messages=HELLO, logprobs=True, top_logprobs=2, **kw)
    else:
        out = client.completions.create(prompt=PROMPT, logprobs=2, **kw)
    chunks = list(out) if stream else [out]
    usage = chunks[-1].usage
    choices = [c.choices[0] for c in chunks if c.choices]
    finish = [c.finish_reason for c in choices if c.finish_reason]
    if route == "chat":
        text = "".join((c.delta.content or "") if stream else c.message.content for c in choices)
        entries = [e for c in choices if c.logprobs for e in c.logprobs.content]
        tops = [len(e.top_logprobs) for e in entries]
    else:
        text = "".join(c.text for c in choices)
        entries = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
        tops = [len(t) for c in choices if c.logprobs for t in c.logprobs.top_logprobs]
    assert text == "" and finish == ["stop"]
    assert usage.completion_tokens == 1 and len(entries) == 1
    assert tops == [2] if route == "chat" else tops[0] in (2, 3)     # completions: the top 2 and the token itself


@pytest.mark.parametrize("stream", [False, True])
def test_text_offsets_index_the_text_when_tokens_cut_characters(client, loaded, stream):
    """Byte-level tokens that cut an emoji: offsets never go back, the completion's follow the echoed prompt,
    and none passes the end of the text (each is where the text its earlier tokens completed ends)."""
    prompt = "🙂🙃 ok 🙂"
    kw = dict(model=loaded.name, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=0)
    if stream:
        text, offsets = "", []
        for chunk in client.completions.create(stream=True, **kw):
            text += chunk.choices[0].text
            offsets += chunk.choices[0].logprobs.text_offset if chunk.choices[0].logprobs else []
    else:
        choice = client.completions.create(**kw).choices[0]
        text, offsets = choice.text, choice.logprobs.text_offset
    ids = loaded.tokenizer.encode(prompt)
    n = len(ids)
    assert len(offsets) == n + 4 and text.startswith(prompt)
    assert offsets == sorted(offsets) and offsets[-1] <= len(text) and offsets[n] == len(prompt)
    completed = [len(loaded.tokenizer.decode(ids[:i], False).rstrip("\ufffd")) for i in range(n)]
    assert offsets[:n] == completed and len(set(completed)) < n      # (some tokens did cut a character)


@pytest.mark.parametrize("stream", [False, True])
def test_a_character_cut_by_max_tokens_is_not_shown(client, loaded, stream):
    """The one token generated is the first byte of an emoji (forced by logit_bias): vLLM shows nothing, not
    U+FFFD; the token still counts."""
    first_byte = loaded.tokenizer.encode("🙂")[0]
    assert loaded.tokenizer.decode([first_byte]) == "\ufffd"
    kw = dict(model=loaded.name, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(first_byte): 100})
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text, usage = "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage
    else:
        out = client.completions.create(**kw)
        text, usage = out.choices[0].text, out.usage
    assert text == "" and usage.completion_tokens == 1
    chat = client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=1,
                                          logit_bias={str(first_byte): 100})
    assert chat.choices[0].message.content == "" and chat.choices[0].finish_reason == "length"
