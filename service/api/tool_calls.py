"""Tool calls parsed back from a model's text, for the chat-template format this server knows: Hermes' (Qwen2.5,
Hermes and many fine-tunes), whose template tells the model to answer with
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks. A template that mentions `<tool_call>` gets
its calls parsed into OpenAI's `tool_calls` (finish reason `tool_calls`, the rest of the text as `content`);
a block that is not a well-formed call leaves the whole text as content. Templates with other formats still
get `tools` in their prompt and answer with plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Optional

from service.json_nesting import check_depth

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parses_tool_calls(template: Optional[str]) -> bool:
    return bool(template) and "<tool_call>" in template


def tool_calls(text: str) -> tuple[Optional[str], list[dict]]:
    """(content, OpenAI tool calls) of a model's `text`; ([text], []) when it holds no well-formed call."""
    calls = []
    for match in HERMES.finditer(text):
        try:
            check_depth(match.group(1))           # TooDeep is a ValueError: such text is no call
            call = json.loads(match.group(1))
        except ValueError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    if not calls:
        return text, []
    return HERMES.sub("", text).strip() or None, calls
