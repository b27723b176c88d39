"""The request fields that ask for structured output, and the engine `Constraint` each one becomes.

OpenAI's `response_format` (`text`, `json_object`, `json_schema` with `json_schema.schema`), vLLM's
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (Lark, llguidance's dialect) and its newer
`structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object`), and TGI's `grammar`
(`{"type": "json" | "regex" | "json_schema", "value": ...}`) and LoRAX's `response_format` (`{"type":
"json_object", "schema"?}`). A request may ask for one of them; two are a 400 naming both, a malformed value
a 400 naming its field (the schema's or grammar's own errors come from the engine's check, also naming the
field). OpenAI's `strict` is accepted either way: the output always follows the schema exactly. A
`json_schema`'s labels are checked as OpenAI checks them (`name`: 1-64 letters, digits, `_` or `-`;
`description` a string; `strict` a boolean) though they change nothing in the output.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from service.engine import Constraint

from .errors import shown

ANY_JSON_OBJECT = {"type": "object"}
JSON_SCHEMA_KEYS = ("name", "description", "schema", "strict")
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")          # OpenAI's rule for json_schema.name


def check_schema_labels(spec: dict, field: str) -> None:
    """A 400 naming the label when a json_schema's `name`, `description` or `strict` is not what OpenAI takes
    (each may be left out: TGI's and older clients send none)."""
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and _SCHEMA_NAME.fullmatch(name)):
        raise HTTPException(400, f"{field}.name: {shown(str(name))} is not a schema name (1 to 64 letters, digits, "
                                 "'_' or '-', as OpenAI requires)")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise HTTPException(400, f"{field}.description: must be a string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise HTTPException(400, f"{field}.strict: must be true or false")


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`; its other keys (whitespace and backend options) are refused as unknown."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: Optional[Union[str, dict[str, Any], bool]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


def _one(found: list[tuple[str, Constraint]]) -> Optional[Constraint]:
    if len(found) > 1:
        raise HTTPException(400, f"{found[0][0]} and {found[1][0]}: ask for one kind of structured output")
    return found[0][1] if found else None


def build_constraint(field: str, make, value) -> Constraint:
    try:
        return make(value, field)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


# the keys each `response_format` type takes: OpenAI's (and vLLM's) three; on `json_object` also a schema as
# `value` (TGI's chat route; huggingface_hub's InferenceClient sends a json_schema that way) or `schema` (LoRAX's);
# TGI's own `json` (a schema) and `regex` with `value`
FORMAT_KEYS = {"text": ("type",), "json_object": ("type", "value", "schema"), "json_schema": ("type", "json_schema"),
               "json": ("type", "value"), "regex": ("type", "value")}


def openai_response_format(fmt: Optional[dict[str, Any]], field: str = "response_format") -> Optional[Constraint]:
    """OpenAI's (and vLLM's) `response_format`, with TGI's and LoRAX's variants: None for text."""
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if not isinstance(kind, str) or kind not in FORMAT_KEYS:
        raise HTTPException(400, f"{field}.type: {shown(str(kind))} is not supported (text, json_object, "
                                 "json_schema; TGI's json, regex)")
    keys = FORMAT_KEYS[kind]
    unknown = next((k for k in fmt if k not in keys), None)
    if unknown is not None:                  # e.g. a json_schema beside type json_object would be dropped
        raise HTTPException(400, f"{field}.{shown(unknown)}: not a key of type {shown(kind)} "
                                 f"({', '.join(keys)})")
    if kind == "text":
        return None
    if kind == "regex":
        return build_constraint(f"{field}.value", Constraint.regex, fmt.get("value"))
    if kind in ("json_object", "json"):
        given = [k for k in ("value", "schema") if k in fmt]
        if len(given) > 1:
            raise HTTPException(400, f"{field}: give the schema as `value` or as `schema`, not both")
        if kind == "json" and not given:
            raise HTTPException(400, f"{field}.value: required with type json (a JSON schema)")
        where = f"{field}.{given[0]}" if given else field
        return build_constraint(where, Constraint.json_schema, fmt[given[0]] if given else ANY_JSON_OBJECT)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise HTTPException(400, f"{field}.json_schema: required with type json_schema (an object with `schema`)")
    unknown = next((k for k in spec if k not in JSON_SCHEMA_KEYS), None)
    if unknown is not None:
        raise HTTPException(400, f"{field}.json_schema.{shown(unknown)}: not supported (name, description, "
                                 "schema, strict)")
    check_schema_labels(spec, f"{field}.json_schema")
    return build_constraint(f"{field}.json_schema.schema", Constraint.json_schema, spec.get("schema", ANY_JSON_OBJECT))


def openai_constraint(req) -> Optional[Constraint]:
    """The constraint of an OpenAI-route request (`_Common`), from whichever field asks for one."""
    found = []
    fmt = openai_response_format(req.response_format)
    if fmt is not None:
        found.append(("response_format", fmt))
    for field, make in (("guided_json", Constraint.json_schema), ("guided_regex", Constraint.regex),
                        ("guided_choice", Constraint.choice), ("guided_grammar", Constraint.grammar)):
        value = getattr(req, field)
        if value is not None:
            found.append((field, build_constraint(field, make, value)))
    outputs: Optional[StructuredOutputs] = req.structured_outputs
    if outputs is not None:
        for key, make in (("json_", Constraint.json_schema), ("regex", Constraint.regex),
                          ("choice", Constraint.choice), ("grammar", Constraint.grammar)):
            value = getattr(outputs, key)
            field = f"structured_outputs.{key.rstrip('_')}"
            if value is not None:
                found.append((field, build_constraint(field, make, value)))
        if outputs.json_object:
            found.append(("structured_outputs.json_object",
                          build_constraint("structured_outputs.json_object", Constraint.json_schema, ANY_JSON_OBJECT)))
    return _one(found)


def tgi_constraint(grammar: Optional[dict[str, Any]], response_format: Optional[dict[str, Any]]) -> Optional[Constraint]:
    """TGI's `parameters.grammar` and LoRAX's `parameters.response_format` (statuses are TGI's 422)."""
    found = []
    if grammar is not None:
        kind, value = grammar.get("type"), grammar.get("value")
        field = "parameters.grammar.value"
        unknown = next((k for k in grammar if k not in ("type", "value")), None)
        if unknown is not None:
            raise HTTPException(422, f"parameters.grammar.{shown(unknown)}: not supported (type, value)")
        if kind == "json":
            found.append(("parameters.grammar", build_constraint(field, Constraint.json_schema, value)))
        elif kind == "regex":
            found.append(("parameters.grammar", build_constraint(field, Constraint.regex, value)))
        elif kind == "json_schema":         # TGI 3's OpenAI-style variant: value {"name"?, "schema"}
            schema = value.get("schema") if isinstance(value, dict) else None
            found.append(("parameters.grammar", build_constraint(f"{field}.schema", Constraint.json_schema, schema)))
        else:
            raise HTTPException(422, f"parameters.grammar.type: {shown(str(kind))} is not supported "
                                     "(json, regex, json_schema)")
    if response_format is not None:
        kind = response_format.get("type")
        unknown = next((k for k in response_format if k not in ("type", "schema")), None)
        if unknown is not None:
            raise HTTPException(422, f"parameters.response_format.{shown(unknown)}: not supported (type, schema)")
        if kind != "json_object":
            raise HTTPException(422, f"parameters.response_format.type: {shown(str(kind))} is not supported "
                                     "(json_object)")
        found.append(("parameters.response_format",
                      build_constraint("parameters.response_format.schema", Constraint.json_schema,
                             response_format.get("schema") or ANY_JSON_OBJECT)))
    return _one(found)
