"""Structured output in the engine (service/engine/structured.py) on the tiny random decoder of `_tiny.py`, with
a real llguidance grammar over a tiny real tokenizer: the 95 printable ASCII characters (byte-level BPE, no
merges) and `</s>` = the decoder's 96 tokens. Random weights sample whatever the mask lets through, so
everything the grammar allows gets exercised: every constrained answer must parse and validate (property
order, required fields, types, enums), finish by the grammar's end-of-sequence, and constrained and free
requests on different adapters share steps without changing each other's tokens."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from _tiny import HF_KW, tiny_decoder
from service.engine import (Constraint, Engine, EngineConfig, FinishReason, GenerationRequest, Grammars,
                            SamplingParams)
from service.model import Tokenizer
from service.model.tokenizer import bytes_to_unicode

EOS = 95
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "ok": {"type": "boolean"},
        "where": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
                  "required": ["zip"], "additionalProperties": False},
        "note": {"type": "string", "maxLength": 4},
    },
    "required": ["name", "age", "color", "tags", "ok", "where"],
    "additionalProperties": False,
}


def ascii_tokenizer() -> Tokenizer:
    spell = bytes_to_unicode()
    backend = BackendTokenizer(models.BPE(vocab={spell[b]: b - 32 for b in range(32, 127)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["</s>"])
    return Tokenizer(backend, eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizer():
    tok = ascii_tokenizer()
    assert tok.vocab_size == HF_KW["vocab_size"] and tok.eos_token_ids == {EOS}
    return tok


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(tiny_decoder(), EngineConfig(max_batch_size=16, max_seq_len=256),
                  eos_token_ids=[EOS], grammars=Grammars(tokenizer, HF_KW["vocab_size"], [EOS]))


def request(tokenizer, constraint=None, adapter=None, seed=0, temperature=1.0, max_tokens=160, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, constraint=constraint, **kw)
    return GenerationRequest(tokenizer.encode("Q: ", add_special_tokens=False), params, adapter)


def assert_follows_schema(text: str, schema: dict) -> None:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    order = list(schema["properties"])
    assert list(value) == sorted(value, key=order.index)                   # the schema's property order
    for key, sub in schema["properties"].items():
        if sub.get("type") == "object" and key in value:
            assert_follows_schema(json.dumps(value[key]), sub)


def test_json_schema_answers_validate_in_a_batch_mixed_with_free_requests_and_adapters(engine, tokenizer):
    schema = Constraint.json_schema(SCHEMA, "response_format")
    adapters = [None, "lora0", "lora1", "ia3", "lora3"]
    constrained = [request(tokenizer, schema, adapters[i % 5], seed=i) for i in range(10)]
    free = [request(tokenizer, None, adapters[i % 5], seed=100 + i, max_tokens=24) for i in range(5)]
    free_greedy = [request(tokenizer, None, "lora2", temperature=0, max_tokens=24)]
    outs = engine.generate(constrained + free + free_greedy)
    for out in outs[:10]:
        assert out.finish_reason is FinishReason.STOP                   # the grammar ended it, by EOS
        assert_follows_schema(tokenizer.decode(out.token_ids), SCHEMA)
    alone = engine.generate([request(tokenizer, None, r.adapter, seed=r.params.seed, temperature=r.params.temperature,
                                     max_tokens=24) for r in free + free_greedy])
    assert [o.token_ids for o in outs[10:]] == [o.token_ids for o in alone]   # constrained rows change nothing
    again = engine.generate([request(tokenizer, schema, "lora1", seed=2)])[0]
    assert again.token_ids == outs[2].token_ids                        # and are themselves batch-independent


def test_choice_regex_and_lark_grammar(engine, tokenizer):
    choices = ["yes", "no", "a \"quoted\" | pipe"]
    regex = r"[0-9]{3}-[a-z]{2}"
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/'
    outs = engine.generate(
        [request(tokenizer, Constraint.choice(choices, "guided_choice"), seed=i) for i in range(8)]
        + [request(tokenizer, Constraint.regex(regex, "guided_regex"), "lora0", seed=i) for i in range(4)]
        + [request(tokenizer, Constraint.grammar(lark, "guided_grammar"), seed=i, max_tokens=40) for i in range(4)])
    texts = [tokenizer.decode(o.token_ids) for o in outs]
    assert all(t in choices for t in texts[:8]) and len(set(texts[:8])) > 1
    assert all(re.fullmatch(regex, t) for t in texts[8:12])
    assert all(re.fullmatch(r"\([1-9](\+[1-9])*\)", t) for t, o in zip(texts[12:], outs[12:])
               if o.finish_reason is FinishReason.STOP)
    assert all(o.finish_reason is FinishReason.STOP for o in outs[:12])


def test_greedy_constrained_and_max_tokens_cut_with_length(engine, tokenizer):
    schema = Constraint.json_schema(SCHEMA, "response_format")
    cut, greedy = engine.generate([request(tokenizer, schema, max_tokens=5),
                                   request(tokenizer, schema, "lora1", temperature=0)])
    assert cut.finish_reason is FinishReason.LENGTH and len(cut.token_ids) == 5
    assert tokenizer.decode(cut.token_ids) == '{"nam'                  # one character per token here
    assert greedy.finish_reason is FinishReason.STOP
    assert_follows_schema(tokenizer.decode(greedy.token_ids), SCHEMA)


@pytest.mark.parametrize("constraint, message", [
    (Constraint.json_schema({"type": "object", "properties": {"a": {"type": "strng"}}}, "response_format.schema"),
     "response_format.schema: invalid or unsupported JSON schema: Invalid type: strng"),
    (Constraint.json_schema({"type": "object", "if": {}}, "guided_json"), "guided_json: invalid or unsupported"),
    (Constraint.regex("[a-", "guided_regex"), "guided_regex: invalid or unsupported regular expression"),
    # the reason, which llguidance gives on the lines after "regex parse error:" (a probe saw it cut off)
    (Constraint.regex("a{5,2}", "guided_regex"), "error: invalid repetition count range"),
    (Constraint.grammar("start: foo", "guided_grammar"), "guided_grammar: invalid or unsupported grammar"),
    # grammars that match no text: in error at their first mask, found before anything is queued
    (Constraint.grammar("start: start", "guided_grammar"),
     "guided_grammar: invalid or unsupported grammar: no text matches it"),
    (Constraint.json_schema({"$ref": "#"}, "guided_json"),
     "guided_json: invalid or unsupported JSON schema: no text matches it"),
])
def test_bad_constraints_are_refused_at_validate_naming_the_field(engine, tokenizer, constraint, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.validate(request(tokenizer, constraint))


def test_constraint_values_and_conflicts_are_checked(engine, tokenizer):
    with pytest.raises(ValueError, match="guided_json: not valid JSON"):
        Constraint.json_schema("{nope", "guided_json")
    with pytest.raises(ValueError, match="guided_choice: must be a non-empty list"):
        Constraint.choice([], "guided_choice")
    with pytest.raises(ValueError, match="guided_json: the schema `false` matches nothing"):
        Constraint.json_schema(False, "guided_json")
    with pytest.raises(ValueError, match="guided_regex: the regular expression ends with a lone backslash"):
        Constraint.regex("x\\", "guided_regex")                    # llguidance would read it as "x"
    assert Constraint.regex("x\\\\", "guided_regex").value == "x\\\\"     # an escaped backslash is fine
    anything = engine.generate([request(tokenizer, Constraint.json_schema(True, "guided_json"), seed=s, max_tokens=40)
                                for s in range(3)])                   # JSON Schema's `true`: any JSON value
    assert all(o.finish_reason is FinishReason.STOP for o in anything)
    for out in anything:
        json.loads(tokenizer.decode(out.token_ids))                    # raises unless it is one JSON value
    schema = Constraint.json_schema({"type": "object"}, "response_format")
    with pytest.raises(ValueError, match="ignore_eos: cannot be combined with structured output"):
        engine.validate(request(tokenizer, schema, ignore_eos=True))
    with pytest.raises(ValueError, match="min_tokens: cannot be combined"):
        engine.validate(request(tokenizer, schema, min_tokens=2))
    bare = Engine(tiny_decoder(adapters=False), EngineConfig(max_batch_size=2, max_seq_len=64), eos_token_ids=[EOS])
    with pytest.raises(ValueError, match="response_format: structured output is not available"):
        bare.validate(request(tokenizer, schema, max_tokens=8))


@pytest.mark.parametrize("constraint, message", [
    (Constraint.regex("b{999999}", "guided_regex"), "lexer error: too many expressions constructed"),
    (Constraint.choice([f"opt{i}" for i in range(3000)], "guided_choice"), "max is 2000"),
])
def test_a_grammar_failing_as_it_runs_fails_its_request_alone_every_time(engine, tokenizer, constraint, message):
    """llguidance's lazy lexer and parser hit their limits at the first token: the request ends with the client's
    error naming the field, again on a second try (a matcher in error allows only end-of-sequence, which once
    read as an empty "stop"), and a free request in the same steps gets the tokens it gets alone."""
    engine.validate(request(tokenizer, constraint))                    # compiles: the limits come later
    free = request(tokenizer, None, "lora0", seed=7, max_tokens=12)
    alone = engine.generate([free])[0].token_ids
    for _ in range(2):
        events, beside = [], []
        engine.submit(request(tokenizer, constraint, seed=1), events.append)
        engine.submit(request(tokenizer, None, "lora0", seed=7, max_tokens=12), beside.append)
        while engine.has_work():
            engine.step()
        last = events[-1]
        assert last.finish_reason is FinishReason.ERROR and last.client_error
        assert last.error.startswith(f"{constraint.field}: the grammar failed during generation") and message in last.error
        assert all(e.token_id is None for e in events)                # nothing of it was sent as a token
        assert [e.token_id for e in beside if e.token_id is not None] == alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_under_a_grammar_is_the_argmax_over_the_allowed_tokens(engine, tokenizer, dtype):
    grammars = engine.grammars
    guide = grammars.guide(Constraint.regex("[a-f]+", "guided_regex"))
    grammars.fill([guide])
    allowed = torch.from_numpy(guide.allowed)
    assert tokenizer.decode(allowed.nonzero().flatten().tolist()) == "abcdef"
    masked_away = 0
    for seed in range(5):
        logits = (3 * torch.randn(HF_KW["vocab_size"], generator=torch.Generator().manual_seed(seed))).to(dtype)
        expected = int(torch.where(allowed, logits.float(), float("-inf")).argmax())
        assert guide.greedy(logits) == expected
        masked_away += int(logits.float().argmax()) != expected        # the mask changed the choice
    assert masked_away >= 3


@pytest.mark.parametrize("bound", [-100000000000000000009, -2**63, -2**63 + 800, 10**20, 2**63, -9.3e18])
def test_integer_bounds_past_the_grammar_engines_range_are_refused(bound):
    """llguidance 1.9 crashed the whole process on an integer range within ~1,000 of -2**63 (a stack overflow),
    and gave values outside ranges past 2**63: such bounds are a ValueError naming the bound, before compiling."""
    schema = {"type": "object", "properties": {"i": {"type": ["integer", "null"], "minimum": bound}}}
    with pytest.raises(ValueError, match=r"guided_json\.properties\.i\.minimum: integer bounds must lie within"):
        Constraint.json_schema(schema, "guided_json")
    Constraint.json_schema({"properties": {"i": {"type": "integer", "minimum": -9 * 10**18}}}, "guided_json")
    Constraint.json_schema({"properties": {"x": {"type": "number", "minimum": 1e300}}}, "guided_json")
