"""A chat request's tools and tool turns, checked as OpenAI and vLLM check them, and made ready for templates.

`tools`: each one `{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}`; the
name as OpenAI allows it (1-64 letters, digits, `_` or `-`), no two alike; `parameters` a JSON-schema object
(vLLM's `ChatCompletionToolsParam`: `type` must be "function"); an empty list is no tools, as vLLM takes it.
A `tool` message needs its `tool_call_id` (OpenAI's 400). An assistant turn's `tool_calls` carry each call's
`function.arguments` as OpenAI clients send them, a JSON string; templates (Llama 3.1's, Qwen2.5's, Mistral's
`| tojson`) expect the object, so the string is parsed before rendering, as vLLM does (else the prompt holds a
doubly encoded string the model was never trained on). Every problem is a 400 naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from fastapi import HTTPException

from service.model.chat_template import uses_variable

from .errors import shown
from .openai_requests import Message, content_text

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


def check_tools(tools: Optional[list[Any]]) -> Optional[list[dict]]:
    """The tools to render (None for none); HTTPException 400 naming the first problem."""
    if not tools:
        return None
    names: set[str] = set()
    for i, tool in enumerate(tools):
        field = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise HTTPException(400, f"{field}.type: must be \"function\" (the only tool type served)")
        unknown = sorted(set(tool) - {"type", "function"})
        if unknown:
            raise HTTPException(400, f"{field}: unknown field {shown(unknown[0])}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise HTTPException(400, f"{field}.function: required, an object with the function's name")
        unknown = sorted(set(function) - FUNCTION_KEYS)
        if unknown:
            raise HTTPException(400, f"{field}.function: unknown field {shown(unknown[0])}")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise HTTPException(400, f"{field}.function.name: must be 1-64 letters, digits, '_' or '-'; got "
                                     f"{shown(str(name))}")
        if name in names:
            raise HTTPException(400, f"{field}.function.name: {shown(name)} is named by an earlier tool too")
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise HTTPException(400, f"{field}.function.description: must be a string")
        parameters = function.get("parameters")
        if parameters is not None and not (isinstance(parameters, dict) and parameters.get("type", "object")
                                           == "object"):
            raise HTTPException(400, f"{field}.function.parameters: must be a JSON schema of an object "
                                     "(`{\"type\": \"object\", \"properties\": ...}`)")
        if "strict" in function and not isinstance(function["strict"], bool):
            raise HTTPException(400, f"{field}.function.strict: must be a boolean")
    return tools


def template_tools(tools: Optional[list[Any]], template: Optional[str], rendered: bool = True) -> Optional[list[dict]]:
    """`check_tools`, and a 400 when the tools are `rendered` and the model's chat template does not read them."""
    tools = check_tools(tools)
    if tools and rendered and not uses_variable(template, "tools"):
        raise HTTPException(400, "tools: this model's chat template does not support tools")
    return tools


def template_turns(messages: list[Message]) -> list[dict[str, Any]]:
    """A request's messages as the template's dicts: content parts joined (`content_text`), each tool call's
    arguments parsed (`template_messages`)."""
    return template_messages([{**m.model_dump(exclude_none=True),
                               "content": content_text(m.content, f"messages[{i}].content")}
                              for i, m in enumerate(messages)])


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each tool call's `arguments` string parsed to the object templates expect (a copy where
    changed); a `tool` message without `tool_call_id` or a call whose arguments are not a JSON object is a 400."""
    out = []
    for i, message in enumerate(messages):
        if message.get("role") == "tool" and not message.get("tool_call_id"):
            raise HTTPException(400, f"messages[{i}].tool_call_id: required in a tool message")
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_call(call, f"messages[{i}].tool_calls[{j}]")
                                                 for j, call in enumerate(calls)]}
        out.append(message)
    return out


def _call(call: Any, field: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise HTTPException(400, f"{field}.function: required, with the called function's name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise HTTPException(400, f"{field}.function.arguments: not valid JSON ({exc})") from None
    if not isinstance(arguments, dict):
        raise HTTPException(400, f"{field}.function.arguments: must be a JSON object")
    return {**call, "function": {**function, "arguments": arguments}}
