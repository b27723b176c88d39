"""Hostile and careless requests, round 3, over a real server on the tiny model: what a black-box probe of the
HTTP API found accepted and silently ignored, or answered with an unclear error. Every field, form part and
query parameter a route does not take is refused naming it; a body that is empty, not JSON, not UTF-8,
compressed or sent with another Content-Type says so; a 405 says which methods the route takes, as a client
error; stop strings may not be empty or invalid Unicode; a user turn needs its content; TGI's `stream` must
fit the route; merged adapters' weights are bounded. Each test failed before its fix (RELIABILITY.md, "Hostile
input, round 3"), and a refused request leaves the adapters as they were.
"""
from __future__ import annotations

import gzip
import json

import httpx
import pytest

from _rel_live import CONFIG, T, WEIGHTS, listing, live_server, still_serving, upload_folder
from _rel_tiny import make_adapter

pytestmark = pytest.mark.slow

BASE = "tiny-llama"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile3")
    with live_server(root / "store") as live:
        live.folder = make_adapter(root / "ref", seed=1)
        assert upload_folder(live.url, "ref", live.folder).status_code == 201
        yield live


def post(live, path: str, body, content_type: str = "application/json", **headers) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{live.url}{path}", content=content, headers={"content-type": content_type, **headers},
                      timeout=T)


def error(r: httpx.Response, status: int, *words: str) -> str:
    """The error message, after checking the status, the route's shape (OpenAI's with a client error's type;
    TGI's `{"error": message, "error_type": "validation"}` on its routes) and `words`."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    if r.request.url.path in ("/", "/generate", "/generate_stream"):
        body = r.json()
        assert isinstance(body["error"], str) and body.get("error_type") in ("validation", None), body
        message = body["error"]
    else:
        body = r.json()["error"]
        assert body["code"] == status and body["type"] == "invalid_request_error", body
        message = body["message"]
    for word in words:
        assert word in message, message
    return message


COMPLETION = {"model": BASE, "prompt": "hello", "max_tokens": 2, "temperature": 0}


def test_a_body_that_is_not_a_json_object_says_what_it_is(live):
    error(post(live, "/v1/completions", b""), 422, "the request body is empty")
    error(post(live, "/v1/completions", [1]), 422, "the request body must be a JSON object")
    error(post(live, "/v1/completions", COMPLETION, "text/plain"), 415, "Content-Type 'text/plain'",
          "application/json")
    error(post(live, "/v1/completions", b'{"model": "\xff"}'), 400, "not valid UTF-8")
    error(post(live, "/v1/completions", '{"max_tokens": ' + "9" * 5000 + "}"), 400, "not valid JSON",
          "4300 digits")
    error(post(live, "/v1/completions", gzip.compress(json.dumps(COMPLETION).encode()),
               **{"content-encoding": "gzip"}), 415, "Content-Encoding 'gzip'")
    error(post(live, "/v1/completions", COMPLETION, **{"content-encoding": "gzip"}), 415)   # said, not sent
    assert post(live, "/v1/completions", COMPLETION, **{"content-encoding": "identity"}).status_code == 200


def test_unknown_query_parameters_are_refused_naming_what_the_route_takes(live):
    error(httpx.get(f"{live.url}/v1/models?foo=1", timeout=T), 422, "query parameter 'foo'", "it takes none")
    r = httpx.post(f"{live.url}/admin/adapters?replace=true&force=1", data={"name": "x"}, timeout=T)
    error(r, 422, "query parameter 'force'", "replace")
    assert httpx.get(f"{live.url}/v1/models", timeout=T).status_code == 200


def test_a_wrong_method_is_a_405_client_error_naming_the_allowed_ones(live):
    r = httpx.delete(f"{live.url}/v1/completions", timeout=T)
    error(r, 405, "method DELETE is not allowed on /v1/completions", "POST")


def test_upload_form_parts_are_named_and_taken_once(live):
    before = listing(live.url)
    files = {CONFIG: (live.folder / CONFIG).read_bytes(), WEIGHTS: (live.folder / WEIGHTS).read_bytes()}
    url = f"{live.url}/admin/adapters"
    error(httpx.post(url, data={"name": "t1", "foo": "1"}, files=files, timeout=T), 422, "form field 'foo'")
    error(httpx.post(url, data={"name": "t1"}, files={**files, "junk": b"x"}, timeout=T), 422, "form field 'junk'")
    error(httpx.post(url, data={"name": ["t1", "t2"]}, files=files, timeout=T), 422, "form field 'name' is sent 2")
    two = [(CONFIG, files[CONFIG]), (WEIGHTS, files[WEIGHTS]), (WEIGHTS, files[WEIGHTS])]
    error(httpx.post(url, data={"name": "t1"}, files=two, timeout=T), 422, f"form field '{WEIGHTS}' is sent 2")
    error(post(live, "/admin/adapters", {"name": "t1"}), 415, "multipart/form-data")
    assert listing(live.url) == before


def test_admin_and_vllm_bodies_take_only_their_fields(live):
    before = listing(live.url)
    path = str(live.folder)
    for body, words in [({"source": "local", "path": path, "extra": 1}, ("extra",)),
                        ({"source": "local", "path": path, "repo_id": "a/b"}, ("'repo_id'", "source 'hub'")),
                        ({"source": "hub", "repo_id": "a/b", "path": path}, ("'path'", "source 'local'"))]:
        error(httpx.put(f"{live.url}/admin/adapters/t2", json=body, timeout=T), 422, *words)
    error(post(live, "/v1/load_lora_adapter", {"lora_name": "t2", "lora_path": path, "load_inplace": True}), 422,
          "load_inplace")
    error(post(live, "/v1/unload_lora_adapter", {"lora_name": "ref", "lora_int_id": 3}), 422, "lora_int_id")
    assert listing(live.url) == before
    still_serving(live.url, "ref")


def test_openai_fields_that_were_dropped_are_refused(live):
    error(post(live, "/v1/completions", {**COMPLETION, "response_format": {"type": "text", "foo": 1}}), 400,
          "response_format.'foo'")
    schema = {"schema": {"type": "string"}}
    error(post(live, "/v1/completions", {**COMPLETION, "response_format": {"type": "json_object",
                                                                           "json_schema": schema}}), 400,
          "response_format.'json_schema'", "json_object")
    part = {"type": "text", "text": "hi", "extra": 1}
    error(post(live, "/v1/chat/completions", {"model": BASE, "max_tokens": 2, "messages": [
        {"role": "user", "content": [part]}]}), 400, "messages[0].content[0].'extra'")
    error(post(live, "/v1/chat/completions", {"model": BASE, "max_tokens": 2, "messages": [{"role": "user"}]}),
          422, "content is required in a 'user' message")
    error(post(live, "/tokenize", {"messages": [{"role": "system"}]}), 422, "content is required in a 'system'")
    ok = post(live, "/tokenize", {"messages": [{"role": "assistant"}], "add_generation_prompt": False})
    assert ok.status_code == 200, ok.text                           # an assistant turn may omit it


@pytest.mark.parametrize("stop", ["", [""], ["ok", ""], ["a\ud800"]])
def test_stop_strings_must_be_text_that_can_match(live, stop):
    error(post(live, "/v1/completions", {**COMPLETION, "stop": stop}), 422, "stop string")
    r = post(live, "/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 2,
                                                                   "stop": stop if isinstance(stop, list) else [stop]}})
    error(r, 422, "stop string")


def test_tgi_stream_flag_must_fit_the_route(live):
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    error(post(live, "/generate", {**body, "stream": True}), 422, "stream: true does not fit POST /generate")
    error(post(live, "/generate_stream", {**body, "stream": False}), 422, "stream: false does not fit")
    assert post(live, "/generate", {**body, "stream": False}).status_code == 200
    with httpx.stream("POST", f"{live.url}/generate_stream", json={**body, "stream": True}, timeout=T) as r:
        assert r.status_code == 200 and any(line.startswith("data:") for line in r.iter_lines())
    with httpx.stream("POST", f"{live.url}/", json={**body, "stream": True}, timeout=T) as r:   # TGI's own route
        assert r.status_code == 200 and any(line.startswith("data:") for line in r.iter_lines())


@pytest.mark.parametrize("weight", [1e308, -1e308, 10.5])
def test_merged_adapter_weights_are_bounded(live, weight):
    r = post(live, "/generate", {"inputs": "hello", "parameters": {
        "max_new_tokens": 2, "merged_adapters": {"ids": ["ref"], "weights": [weight]}}})
    error(r, 422, "parameters.merged_adapters.weights", "[-10, 10]")
    ok = post(live, "/generate", {"inputs": "hello", "parameters": {
        "max_new_tokens": 2, "merged_adapters": {"ids": ["ref"], "weights": [10]}}})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("n", "2"), ("n", 2.0), ("seed", True),
                                          ("temperature", "0"), ("echo", 1), ("stream", "true"), ("best_of", "3")])
def test_numbers_and_booleans_are_taken_as_json_gives_them_not_converted(live, field, value):
    error(post(live, "/v1/completions", {**COMPLETION, field: value}), 422, field)
    r = post(live, "/generate", {"inputs": "hello", "parameters": {"max_new_tokens": "2"}})
    error(r, 422, "parameters.max_new_tokens")


def test_json_integers_still_fill_float_fields(live):
    r = post(live, "/v1/completions", {**COMPLETION, "temperature": 1, "top_p": 1})
    assert r.status_code == 200, r.text


def test_a_tgi_stream_that_ends_normally_counts_as_a_success(live):
    """The TGI routes close the piece generator as soon as they have the last piece; that close once
    overwrote the request's outcome with "cancelled" (the console's rates and any alert on cancellations)."""
    def outcomes() -> dict:
        return httpx.get(f"{live.url}/stats", timeout=T).json()["totals"]["requests"]

    before = outcomes()
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    for path, extra in (("/generate_stream", {}), ("/", {"stream": True})):
        with httpx.stream("POST", f"{live.url}{path}", json={**body, **extra}, timeout=T) as r:
            assert r.status_code == 200 and [line for line in r.iter_lines() if line.startswith("data:")]
    after = outcomes()
    assert after.get("success", 0) - before.get("success", 0) == 2, (before, after)
    assert after.get("cancelled", 0) == before.get("cancelled", 0), (before, after)
