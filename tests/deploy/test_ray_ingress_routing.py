"""The Ray Serve ingress's routing key without a cluster: which adapter (the multiplexed model id) a request
names, per route, and the requests Serve spreads by load instead."""
import json

import pytest

pytest.importorskip("ray")
from service.ray_serve.ingress import adapter_of  # noqa: E402


@pytest.mark.parametrize("path, body, expected", [
    ("/v1/completions", {"model": "sql", "prompt": "x"}, "sql"),
    ("/v1/chat/completions", {"model": "sql", "messages": []}, "sql"),
    ("/v1/responses", {"model": "sql", "input": "x"}, "sql"),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": "sql"}}, "sql"),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": "sql", "merged_adapters": {"ids": ["a"]}}}, None),
    ("/v1/responses", {"model": "base", "input": "x"}, None),
    ("/v1/responses", {"input": "x"}, None),
    ("/tokenize", {"model": "sql", "prompt": "x"}, None),
])
def test_the_adapter_a_request_names(path, body, expected):
    assert adapter_of("POST", path, json.dumps(body).encode(), "base") == expected


def test_what_does_not_parse_goes_by_load():
    assert adapter_of("POST", "/v1/responses", b"{not json", "base") is None
    assert adapter_of("GET", "/v1/responses", b'{"model": "sql"}', "base") is None
