"""The request body of OpenAI's Responses API (`POST /v1/responses`), and its translation into what the chat
route already serves: chat messages, sampling settings and a structured-output constraint.

`input` is a string (one user message) or a list of messages (`role` user / assistant / system / developer,
`content` a string or `input_text` / `output_text` parts; `type: "message"` optional); `instructions` becomes
a system message in front, as OpenAI inserts it; a `developer` message is given to the chat template as a
`system` one (open models' templates know no developer role). `text.format` is `text`, `json_object` or
`json_schema` (flat: `name`, `schema`, `description`, `strict`). `include: ["message.output_text.logprobs"]`
with `top_logprobs` (0-20) returns log-probabilities; `reasoning.effort` goes to a chat template that reads
`reasoning_effort` (as on the chat route). Responses are not stored: `store: true`, `previous_response_id`,
`background`, `conversation` and `prompt` are refused with a 400 naming them, and so are tools (this server parses tool calls on the chat route only), images and files; fields this
model does not declare are a 422, as everywhere.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from service.engine import Constraint, SamplingParams
from service.engine.sampling import MAX_TOP_LOGPROBS

from .errors import shown
from .openai_requests import content_text
from .prompts import text_bytes
from .structured_output import ANY_JSON_OBJECT, build_constraint, check_schema_labels

LOGPROBS = "message.output_text.logprobs"
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
PART_KEYS = ("type", "text", "annotations", "logprobs")      # (an assistant turn's output_text as returned)
FORMAT_KEYS = {"text": ("type",), "json_object": ("type",),
               "json_schema": ("type", "name", "schema", "description", "strict")}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = Field(None, description="an adapter's name or the base model's id; none: the base model")
    input: Optional[Union[str, list[dict[str, Any]]]] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    include: Optional[list[str]] = None
    stream: Optional[StrictBool] = None
    text: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    store: Optional[StrictBool] = None
    metadata: Optional[dict[str, str]] = Field(None, max_length=16, description="OpenAI's limits: 16 pairs, keys "
                                               "of at most 64 characters, values of at most 512")
    user: Optional[str] = Field(None, max_length=256)
    truncation: Optional[Literal["disabled", "auto"]] = None
    previous_response_id: Optional[str] = None
    background: Optional[StrictBool] = None
    conversation: Optional[Union[str, dict[str, Any]]] = None
    prompt: Optional[dict[str, Any]] = None
    reasoning: Optional[dict[str, Any]] = None
    adapter_scale: float = Field(1.0, allow_inf_nan=False, description="this server's extension: multiplies the "
                                 "adapter's LoRA delta (1 = as trained, 0 = the base model)")


def check(req: ResponsesRequest) -> None:
    """400 naming a field this server cannot honour."""
    for key, value in (req.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise HTTPException(400, f"metadata: keys have at most 64 characters and values at most 512 "
                                     f"(key {shown(key, 80)})")
    if req.store:
        raise HTTPException(400, "store: responses are not stored on this server; send store: false or leave it out")
    for field in ("previous_response_id", "conversation", "prompt"):
        if getattr(req, field) is not None:
            raise HTTPException(400, f"{field}: not supported (responses are not stored; send the whole "
                                     "conversation as input)")
    if req.background:
        raise HTTPException(400, "background: not supported (responses are not stored)")
    unknown = next((k for k in (req.reasoning or {}) if k not in ("effort", "summary")), None)
    if unknown is not None:
        raise HTTPException(400, f"reasoning.{shown(str(unknown))}: not supported (effort)")
    if (req.reasoning or {}).get("summary") is not None:
        raise HTTPException(400, "reasoning.summary: not supported (no reasoning summaries)")
    if (req.reasoning or {}).get("effort") not in (None, "minimal", "low", "medium", "high"):
        raise HTTPException(400, "reasoning.effort: one of minimal, low, medium, high")
    if req.tools:
        raise HTTPException(400, "tools: not supported on /v1/responses (use /v1/chat/completions)")
    if req.tool_choice not in (None, "none", "auto"):
        raise HTTPException(400, "tool_choice: needs tools, which /v1/responses does not take here")
    if req.truncation == "auto":
        raise HTTPException(400, "truncation: only \"disabled\" (an input over the limit is a 400)")
    unknown = next((item for item in req.include or () if item != LOGPROBS), None)
    if unknown is not None:
        raise HTTPException(400, f"include: {shown(unknown)} is not supported (only {LOGPROBS!r})")
    if req.top_logprobs and LOGPROBS not in (req.include or ()):
        raise HTTPException(400, f"top_logprobs: needs include: [{LOGPROBS!r}]")


def _text(content: Any, field: str) -> str:
    """A string, or `input_text` / `output_text` parts joined as the chat route joins its text parts; valid
    Unicode, or a 400 naming the field."""
    if isinstance(content, str):
        text_bytes(content, field)
        return content
    if not isinstance(content, list):
        raise HTTPException(400, f"{field}: a string or a list of text parts")
    text = content_text(content, field, TEXT_PARTS, PART_KEYS)
    for j, part in enumerate(content):
        text_bytes(part["text"], f"{field}[{j}].text")
    return text


def messages(req: ResponsesRequest) -> list[dict[str, str]]:
    """The chat messages the input stands for (`instructions` first, as a system message)."""
    chat = [{"role": "system", "content": _text(req.instructions, "instructions")}] \
        if req.instructions is not None else []
    if req.input is None:
        if not chat:
            raise HTTPException(400, "input: required (or instructions)")
        return chat
    if isinstance(req.input, str):
        text_bytes(req.input, "input")
        return chat + [{"role": "user", "content": req.input}]
    if not req.input:
        raise HTTPException(400, "input: the list is empty")
    for i, item in enumerate(req.input):
        field = f"input[{i}]"
        kind = item.get("type", "message")
        if kind != "message":
            raise HTTPException(400, f"{field}.type: {shown(str(kind))} items are not supported (messages only)")
        extra = next((k for k in item if k not in ("type", "role", "content", "id", "status")), None)
        if extra is not None:
            raise HTTPException(400, f"{field}.{shown(str(extra))}: not a key of a message (role, content)")
        role = item.get("role")
        if role not in ROLES:
            raise HTTPException(400, f"{field}.role: {shown(str(role))} is not one of {', '.join(ROLES)}")
        if "content" not in item:
            raise HTTPException(400, f"{field}.content: required")
        chat.append({"role": "system" if role == "developer" else role,
                     "content": _text(item["content"], f"{field}.content")})
    return chat


def constraint(req: ResponsesRequest) -> Optional[Constraint]:
    """`text.format` as the engine's constraint (None for plain text)."""
    text = req.text or {}
    extra = next((k for k in text if k not in ("format", "verbosity")), None)
    if extra is not None:
        raise HTTPException(400, f"text.{shown(str(extra))}: not supported (format)")
    if text.get("verbosity") not in (None, "medium"):
        raise HTTPException(400, "text.verbosity: only \"medium\" (this server does not change its answers' length)")
    fmt = text.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in FORMAT_KEYS:
        raise HTTPException(400, f"text.format.type: {shown(str(kind))} is not supported (text, json_object, "
                                 "json_schema)")
    unknown = next((k for k in fmt if k not in FORMAT_KEYS[kind]), None)
    if unknown is not None:
        raise HTTPException(400, f"text.format.{shown(str(unknown))}: not a key of type {shown(kind)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return build_constraint("text.format", Constraint.json_schema, ANY_JSON_OBJECT)
    if "schema" not in fmt:
        raise HTTPException(400, "text.format.schema: required with type json_schema")
    check_schema_labels(fmt, "text.format")
    return build_constraint("text.format.schema", Constraint.json_schema, fmt["schema"])


def sampling(req: ResponsesRequest, max_tokens: int) -> SamplingParams:
    logprobs = LOGPROBS in (req.include or ())
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, logprobs=logprobs,
                          top_logprobs=req.top_logprobs or 0, constraint=constraint(req))
