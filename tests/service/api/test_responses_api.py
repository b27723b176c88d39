"""OpenAI's Responses API (`POST /v1/responses`) through a real uvicorn server with the official `openai` client:
the same greedy text, usage and log-probabilities as the chat route on the same conversation, on the base model
and an adapter; `instructions`, message lists with parts and the developer role; the streamed events in
OpenAI's order (the client's own `responses.stream` helper accumulates them), `incomplete` at the length
limit, `text.format` through `responses.parse`, and the fields refused naming them."""
import json

import httpx
import openai
import pydantic
import pytest

from test_openai_depth import client, model, server  # noqa: F401  (the base model and "tuned")

pytestmark = pytest.mark.slow
T = 60
HELLO = [{"role": "user", "content": "Say hello."}]


def chat(client, model, messages=HELLO, **kw):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def test_a_response_is_the_chat_answer_in_the_responses_shape(client, model):
    for limit in (4, 40):
        ours = client.responses.create(model=model, input="Say hello.", max_output_tokens=limit, temperature=0)
        theirs = chat(client, model, max_tokens=limit)
        choice = theirs.choices[0]
        assert ours.output_text == choice.message.content and ours.model == model
        assert [item.type for item in ours.output] == ["message"] and ours.output[0].role == "assistant"
        assert (ours.usage.input_tokens, ours.usage.output_tokens, ours.usage.total_tokens) == (
            theirs.usage.prompt_tokens, theirs.usage.completion_tokens, theirs.usage.total_tokens)
        if choice.finish_reason == "length":
            assert ours.status == "incomplete" and ours.incomplete_details.reason == "max_output_tokens"
            assert ours.output[0].status == "incomplete"
        else:
            assert ours.status == "completed" and ours.incomplete_details is None
    assert limit == 40 and ours.status == "completed"        # the longer limit reached the model's own end


def test_instructions_developer_role_and_parts_are_the_chat_messages(client):
    conversation = [{"role": "developer", "content": "Answer in one word."},
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Colour of"},
                                                                    {"type": "input_text", "text": "the sky?"}]},
                    {"role": "assistant", "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
                    {"role": "user", "content": "And grass?"}]
    ours = client.responses.create(model="tuned", input=conversation, instructions="Be kind.", max_output_tokens=8,
                                   temperature=0)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Colour of\nthe sky?"}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And grass?"}]
    assert ours.output_text == chat(client, "tuned", messages, max_tokens=8).choices[0].message.content
    assert ours.instructions == "Be kind."


@pytest.mark.parametrize("limit", [4, 40])
def test_streamed_events_come_in_openais_order_and_add_up(client, model, limit):
    """At the length limit the last event is `response.incomplete`, as OpenAI's (the client's helper then has no
    final response to give, as with OpenAI); a response that ends on its own ends with `response.completed`."""
    whole = client.responses.create(model=model, input="Say hello.", max_output_tokens=limit, temperature=0)
    assert whole.status == ("incomplete" if limit == 4 else "completed")
    with client.responses.stream(model=model, input="Say hello.", max_output_tokens=limit, temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-4].text == whole.output_text and events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    if whole.status == "completed":
        assert stream.get_final_response().output_text == whole.output_text


def test_logprobs_are_the_chat_routes(client):
    ours = client.responses.create(model="tuned", input="Say hello.", max_output_tokens=5, temperature=0,
                                   top_logprobs=2, include=["message.output_text.logprobs"])
    theirs = chat(client, "tuned", max_tokens=5, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    got = ours.output[0].content[0].logprobs
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in got] == \
        [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in theirs]
    with client.responses.stream(model="tuned", input="Say hello.", max_output_tokens=5, temperature=0,
                                 top_logprobs=2, include=["message.output_text.logprobs"]) as stream:
        deltas = [e for e in stream if e.type == "response.output_text.delta"]
    assert [lp.logprob for d in deltas for lp in d.logprobs] == [e.logprob for e in theirs]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int


def test_text_format_json_schema_through_responses_parse(client):
    parsed = client.responses.parse(model="tuned", input="Invent a person.", text_format=Person,
                                    max_output_tokens=40, temperature=0)
    assert isinstance(parsed.output_parsed, Person)
    loose = client.responses.create(model="tuned", input="Give me JSON.", max_output_tokens=40, temperature=0,
                                    text={"format": {"type": "json_object"}})
    assert loose.status == "incomplete" or isinstance(json.loads(loose.output_text), dict)


@pytest.mark.parametrize("extra, status, named", [
    ({"store": True}, 400, "store"),
    ({"previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400, "tools"),
    ({"reasoning": {"effort": "low"}}, 400, "reasoning.effort: this model's chat template does not read it"),
    ({"reasoning": {"summary": "auto"}}, 400, "reasoning.summary"),
    ({"include": ["file_search_call.results"]}, 400, "include"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, 400,
     "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, 400, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, 400, "input[0].role"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x/y", "schema": {"type": "object"}}}}, 400,
     "text.format.name: 'x/y' is not a schema name"),
    ({"text": {"format": {"type": "regex"}}}, 400, "text.format.type"),
    ({"max_output_tokens": 10_000}, 400, "max_output_tokens"),
    ({"frequency_penalty": 1}, 422, "frequency_penalty"),
    ({"temperature": "0"}, 422, "temperature"),
    ({"model": "nope"}, 404, "nope"),
    # the route's own field names (the chat route's before: "messages", "prompt", "max_tokens")
    ({"input": "x" * 100_000}, 400, "input is over"),
    ({"input": None}, 400, "input: required (or instructions)"),
    ({"metadata": {"k" * 65: "v"}}, 400, "metadata: keys have at most 64 characters"),
])
def test_fields_not_honoured_are_refused_naming_them(server, extra, status, named):
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "tuned", "input": "Hi", "max_output_tokens": 2, **extra},
                   timeout=T)
    assert r.status_code == status and named in r.json()["error"]["message"], r.text


def test_text_that_is_not_unicode_is_named_by_its_input_field(server):
    body = b'{"model": "tuned", "max_output_tokens": 2, "input": [{"role": "user", "content": "\\ud800"}]}'
    r = httpx.post(f"{server.url}/v1/responses", content=body, headers={"content-type": "application/json"}, timeout=T)
    assert r.status_code == 400 and "input[0].content: not valid Unicode" in r.json()["error"]["message"], r.text


def test_the_size_limits_speak_of_the_input(server):
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "tuned", "input": "Hi " * 330,
                                                       "max_output_tokens": 64}, timeout=T)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the input has "), r.text


def test_instructions_alone_are_a_conversation(client):
    out = client.responses.create(model="tuned", instructions="Say hello.", max_output_tokens=4, temperature=0)
    assert out.output_text == client.chat.completions.create(
        model="tuned", messages=[{"role": "system", "content": "Say hello."}], max_tokens=4,
        temperature=0).choices[0].message.content


def test_store_false_and_metadata_are_taken(client):
    out = client.responses.create(model="tuned", input="Hi", max_output_tokens=2, store=False, metadata={"k": "v"},
                                  user="u1")
    assert out.store is False and out.metadata == {"k": "v"} and out.user == "u1"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out.id)                # nothing is stored


def test_a_sequence_failing_as_it_runs_ends_with_response_failed(server, client):
    """A schema that compiles and then reaches the grammar library's limits (a pattern of a million characters)
    fails its request alone: streamed, the last event is `response.failed` with the error; not streamed, a 400."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^b{999999}$"}}, "required": ["a"],
              "additionalProperties": False}
    text = {"format": {"type": "json_schema", "name": "x", "schema": schema}}
    events = list(client.responses.create(model="tuned", input="Hi", max_output_tokens=16, text=text, stream=True))
    assert events[-1].type == "response.failed", [e.type for e in events]
    assert events[-1].response.status == "failed" and "grammar" in events[-1].response.error.message
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "tuned", "input": "Hi", "max_output_tokens": 16,
                                                       "text": text}, timeout=T)
    assert r.status_code == 400 and "text.format.schema" in r.json()["error"]["message"], r.text
    assert client.responses.create(model="tuned", input="Hi", max_output_tokens=2).status == "incomplete"
