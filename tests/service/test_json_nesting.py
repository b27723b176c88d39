"""`service.json_nesting`: the depth of a JSON text measured before parsing, against the depth of what Python's
parser builds from it (random documents), with strings, escapes and the limit's edge."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from service.json_nesting import MAX_JSON_DEPTH, TooDeep, check_depth, nesting_depth

text = st.text(alphabet=st.sampled_from(list('ab"\\[]{}: ,\n\u00e9')), max_size=8)
documents = st.recursive(st.none() | st.booleans() | st.integers() | text,
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                         max_leaves=40)


def depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(documents, st.booleans())
def test_the_measured_depth_is_the_parsed_documents_depth(document, ascii_only):
    raw = json.dumps(document, ensure_ascii=ascii_only)
    assert nesting_depth(raw) == nesting_depth(raw.encode()) == depth_of(json.loads(raw))


@pytest.mark.parametrize("raw,depth", [
    ("1", 0), ('"[[{"', 0), ("[]", 1), ('{"a": [{"b": 1}, []]}', 3), (r'["\"[[", {"x\\": "]]"}]', 2),
    ("[[]][[[]]]", 3), ("]]]][", 0), ('["unterminated [[', 3),
])
def test_known_depths(raw, depth):
    """(A closer with nothing open ends what the parser reads: the count may go below zero.)"""
    assert nesting_depth(raw) == depth


def test_the_limit_is_inclusive_and_the_refusal_says_both_numbers():
    check_depth("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    with pytest.raises(TooDeep, match=rf"nests {MAX_JSON_DEPTH + 1} levels deep .* at most {MAX_JSON_DEPTH}"):
        check_depth("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    check_depth(json.dumps(["[" * 100_000]))                         # brackets inside a string do not nest
    check_depth(json.dumps([[i] for i in range(10_000)]))           # many brackets, two levels
    with pytest.raises(TooDeep):
        check_depth(b"{\"a\": " * 200 + b"1" + b"}" * 200)


def test_every_api_route_measures_its_body_first():
    from fastapi.routing import APIRoute

    from service.api.json_route import JsonRoute
    from service.app import create_app
    from service.settings import Settings

    def api_routes(routes) -> list:          # FastAPI >= 0.16x keeps an included router whole, older copies its routes
        out = []
        for route in routes:
            inner = getattr(route, "original_router", None)
            out += api_routes(inner.routes) if inner is not None else [route] if isinstance(route, APIRoute) else []
        return out

    routes = api_routes(create_app(Settings()).routes)
    assert len(routes) > 20 and not [r.path for r in routes if not isinstance(r, JsonRoute)]
