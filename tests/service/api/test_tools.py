"""`tools` and `tool_choice` through a real server and the `openai` client: tools reach a chat template that
reads them (and are refused, naming the field, by one that does not: test_openai_depth), and Hermes-format
`<tool_call>` blocks come back as OpenAI `tool_calls`, streaming and not."""
import dataclasses
import json

import openai
import pytest

from _server import LiveServer
from service.api.tool_calls import tool_calls
from service.app import create_app
from service.generation import Completion, Piece
from service.model import load_model
from service.settings import Settings

pytestmark = pytest.mark.slow

TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call one as <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>
{% endif %}{% if reasoning_effort is defined %}Reasoning: {{ reasoning_effort }}
{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_hermes_blocks_parse_into_openai_tool_calls():
    content, calls = tool_calls(CALL)
    assert content == "Checking." and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    assert tool_calls('<tool_call>{"name": "f", "arguments": "{}"}</tool_call>')[0] is None
    for text in ("no call here", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                 '<tool_call>{"name": "f"', '<tool_call>{"name": "f", "arguments": ' + "[" * 5000 + "]" * 5000
                 + "}</tool_call>"):
        assert tool_calls(text) == (text, [])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    loaded = dataclasses.replace(load_model(None), chat_template=TEMPLATE)
    settings = Settings(adapter_dir=str(tmp_path_factory.mktemp("store")), dtype="float32", max_batch_size=4,
                        max_seq_len=384, max_tokens_limit=32)
    with LiveServer(create_app(settings, loaded)) as live:
        yield live


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_tools_reach_a_template_that_reads_them(client, server):
    model = server.server.config.app.state.serving.model_id
    plain = client.chat.completions.create(model=model, messages=ASK, max_tokens=4, temperature=0)
    tools = client.chat.completions.create(model=model, messages=ASK, max_tokens=4, temperature=0, tools=TOOLS)
    none = client.chat.completions.create(model=model, messages=ASK, max_tokens=4, temperature=0, tools=TOOLS,
                                          tool_choice="none")
    assert tools.usage.prompt_tokens > plain.usage.prompt_tokens == none.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model=model, messages=ASK, max_tokens=4, tools=TOOLS, tool_choice="required")


def test_tool_calls_come_back_parsed(client, server, monkeypatch):
    state = server.server.config.app.state.serving

    async def complete(ids, adapter, params, stop=(), options=None):
        return Completion(CALL, len(ids), 20, "stop")

    async def start_all(jobs, options):
        async def pieces():
            for part in (CALL[:20], CALL[20:]):
                yield Piece(part, token_id=1)
            yield Piece("", finish_reason="stop")
        return [pieces() for _ in jobs]

    monkeypatch.setattr(state.generator, "complete", complete)
    monkeypatch.setattr(state.generator, "start_all", start_all)
    out = client.chat.completions.create(model=state.model_id, messages=ASK, max_tokens=20, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model=state.model_id, messages=ASK, max_tokens=20, tools=TOOLS,
                                                 stream=True))
    last = chunks[-1].choices[0]
    assert last.finish_reason == "tool_calls" and last.delta.content == "Checking."
    assert last.delta.tool_calls[0].function.name == "get_weather" and last.delta.tool_calls[0].index == 0
    assert all(not c.choices[0].delta.content for c in chunks[:-1])


def test_reasoning_effort_reaches_a_template_that_reads_it(client, server):
    """vLLM passes `reasoning_effort` to the chat template (gpt-oss's reads it); here a template reading it gets
    it, in the prompt the usage counts (a template without it: a 400 naming the field, test_client_compat)."""
    model = server.server.config.app.state.serving.model_id
    plain = client.chat.completions.create(model=model, messages=ASK, max_tokens=2, temperature=0)
    high = client.chat.completions.create(model=model, messages=ASK, max_tokens=2, temperature=0,
                                          reasoning_effort="high")
    tokens = server.server.config.app.state.serving.loaded.tokenizer.encode("Reasoning: high\n", add_special_tokens=False)
    assert high.usage.prompt_tokens == plain.usage.prompt_tokens + len(tokens)



def test_responses_reasoning_effort_reaches_the_template_too(client, server):
    model = server.server.config.app.state.serving.model_id
    plain = client.responses.create(model=model, input="Weather in Paris?", max_output_tokens=2, temperature=0)
    high = client.responses.create(model=model, input="Weather in Paris?", max_output_tokens=2, temperature=0,
                                   reasoning={"effort": "high"})
    tokens = server.server.config.app.state.serving.loaded.tokenizer.encode("Reasoning: high\n", add_special_tokens=False)
    assert high.usage.input_tokens == plain.usage.input_tokens + len(tokens) and high.reasoning.effort == "high"


@pytest.mark.parametrize("tools, message", [
    ([{}], r"tools\[0\]\.type: must be \"function\""),
    ([{"type": "retrieval"}], r"tools\[0\]\.type"),
    ([{"type": "function"}], r"tools\[0\]\.function: required"),
    ([{"type": "function", "function": {"name": "get weather!"}}], r"tools\[0\]\.function\.name: must be 1-64"),
    ([{"type": "function", "function": {"name": "x" * 65}}], r"tools\[0\]\.function\.name"),
    ([TOOLS[0], TOOLS[0]], r"tools\[1\]\.function\.name: 'get_weather' is named by an earlier tool too"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1, 2]}}], r"tools\[0\]\.function\.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}], r"\.parameters: must be"),
    ([{"type": "function", "function": {"name": "f", "paramaters": {}}}], r"unknown field 'paramaters'"),
])
def test_bad_tool_definitions_are_400s_naming_them(client, server, tools, message):
    """A probe found every one of these rendered into the prompt with a 200 (OpenAI answers 400)."""
    model = server.server.config.app.state.serving.model_id
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=model, messages=ASK, tools=tools, max_tokens=2)


def test_tool_turns_are_checked_and_their_arguments_reach_templates_as_objects():
    """OpenAI clients send a call's arguments as a JSON string; templates `| tojson` the object (vLLM parses
    the string first), so the string is parsed; a tool message needs its tool_call_id."""
    from fastapi import HTTPException

    from service.api.tool_requests import template_messages

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turns = [ASK[0], {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = template_messages(turns)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert turns[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'        # not changed in place
    with pytest.raises(HTTPException, match=r"messages\[2\]\.tool_call_id: required"):
        template_messages([*turns[:2], {"role": "tool", "content": "sunny"}])
    bad = {**call, "function": {"name": "get_weather", "arguments": "{not json"}}
    with pytest.raises(HTTPException, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"):
        template_messages([ASK[0], {"role": "assistant", "content": None, "tool_calls": [bad]}])


def test_a_chat_template_that_does_not_compile_is_the_servers_500_and_said_at_start(tmp_path, capfd):
    """A probe's folder with a template syntax error started silently and blamed every chat request (400)."""
    from service.model.chat_template import check_template

    broken = "{% for m in messages %}{{ m.content }"
    assert "does not compile" in check_template(broken) and check_template(TEMPLATE) is None
    loaded = dataclasses.replace(load_model(None), chat_template=broken)
    settings = Settings(adapter_dir=str(tmp_path / "store"), dtype="float32", max_batch_size=2, max_seq_len=128,
                        max_tokens_limit=8)
    with LiveServer(create_app(settings, loaded)) as live:
        assert "warning: the model's chat template does not compile" in capfd.readouterr().err
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        model = live.server.config.app.state.serving.model_id
        with pytest.raises(openai.InternalServerError, match="the model's chat template does not compile"):
            client.chat.completions.create(model=model, messages=ASK, max_tokens=2)
        assert client.completions.create(model=model, prompt="Hi", max_tokens=2).choices[0].finish_reason


def test_tokenize_counts_a_chat_with_tools_and_template_variables_as_the_chat_route_does(client, server):
    """vLLM's /tokenize takes `tools` and `chat_template_kwargs` with messages (both were 422s here)."""
    import httpx

    model = server.server.config.app.state.serving.model_id
    chat = client.chat.completions.create(model=model, messages=ASK, max_tokens=1, tools=TOOLS,
                                          extra_body={"chat_template_kwargs": {"reasoning_effort": "low"}})
    r = httpx.post(f"{server.url}/tokenize", json={"model": model, "messages": ASK, "tools": TOOLS,
                                                   "chat_template_kwargs": {"reasoning_effort": "low"}}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == chat.usage.prompt_tokens
    plain = httpx.post(f"{server.url}/tokenize", json={"messages": ASK}, timeout=60).json()["count"]
    assert plain < r.json()["count"]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": ASK, "tools": [{"type": "retrieval"}]}, timeout=60)
    assert r.status_code == 400 and "tools[0].type" in r.text
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "hi", "tools": TOOLS}, timeout=60)
    assert r.status_code == 400 and "tools: only with messages" in r.text
