"""OpenAI's Responses API, `POST /v1/responses`: the chat route's generation in the Responses shapes.

The request (`responses_requests.py`) becomes chat messages rendered by the model's template, sampling settings
and a structured-output constraint; `model` names an adapter or the base model, as on the other OpenAI routes.
The answer is a `response` object with one assistant `message` item holding one `output_text` part (its
`logprobs` when `include` asks), `usage` in input / output tokens, and `status` `completed`, or `incomplete`
with `incomplete_details.reason: "max_output_tokens"` when the length ran out. Streamed (`stream: true`), it is
OpenAI's typed server-sent events, each `event: <type>` with a `sequence_number`: `response.created`,
`response.in_progress`, `response.output_item.added`, `response.content_part.added`, one
`response.output_text.delta` per piece of text, then the `.done` events and `response.completed` (or
`response.incomplete`); a sequence that fails in the engine ends with `response.failed` carrying the error.
Nothing is stored: there is no `GET /v1/responses/{id}`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse

from service.adapter_target import AdapterTarget
from service.generation import TextOptions
from service.model.chat_template import uses_variable
from service.registry import Invalid

from .deps import InferenceCaller, StateDep
from .disconnect import cancel_on_disconnect
from .json_route import JsonRoute
from .logprobs import TokenText
from .openai import SSE, generated_token, max_tokens, resolve_adapter
from .prompts import encode_chat
from .responses_requests import ResponsesRequest, check, messages, sampling

router = APIRouter(route_class=JsonRoute)


class _Shapes:
    """The response object and its message item for one request, in the state they are in."""

    def __init__(self, req: ResponsesRequest, model: str, prompt_tokens: int):
        self.req, self.model, self.prompt_tokens = req, model, prompt_tokens
        self.id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def part(self, text: str, logprobs: list) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}

    def item(self, status: str, parts: list) -> dict:
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": parts}

    def response(self, status: str, output: list, generated: Optional[int] = None, error: Optional[dict] = None,
                 finish_reason: Optional[str] = None) -> dict:
        req = self.req
        usage = None if generated is None else {
            "input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + generated}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": error, "incomplete_details": {"reason": "max_output_tokens"} if finish_reason == "length"
                else None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": self.model, "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": None, "store": False,
                "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
                "temperature": 1.0 if req.temperature is None else req.temperature,
                "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
                "tool_choice": req.tool_choice or "auto", "tools": [],
                "top_logprobs": req.top_logprobs or 0, "top_p": 1.0 if req.top_p is None else req.top_p,
                "truncation": "disabled", "usage": usage, "user": req.user, "metadata": req.metadata or {}}


def final_status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


@router.post("/v1/responses", responses=SSE)
async def create_response(req: ResponsesRequest, state: StateDep, caller: InferenceCaller, request: Request):
    check(req)
    adapter = AdapterTarget(resolve_adapter(state, caller, req.model), scale=req.adapter_scale)
    params = sampling(req, max_tokens(state, req.max_output_tokens, "max_output_tokens"))
    effort = (req.reasoning or {}).get("effort")
    if effort is not None and not uses_variable(state.loaded.chat_template, "reasoning_effort"):
        raise HTTPException(400, "reasoning.effort: this model's chat template does not read it")
    ids = await _in_our_words(encode_chat(state, messages(req), variables={"reasoning_effort": effort} if effort
                                          else None, field="input"))
    shapes, tokens = _Shapes(req, req.model or state.model_id, len(ids)), TokenText(state.loaded.tokenizer)
    if req.stream:
        stream = await cancel_on_disconnect(request, _in_our_words(
            state.generator.start(ids, adapter, params, options=TextOptions())))
        if isinstance(stream, Response):             # the client left while its request waited for a slot
            return stream
        return _sse(_events(shapes, stream, tokens, params.logprobs))
    out = await cancel_on_disconnect(request, _in_our_words(
        state.generator.complete(ids, adapter, params, options=TextOptions())))
    if isinstance(out, Response):
        return out
    logprobs = tokens.chat(out.token_ids, out.logprobs, out.top_logprobs)["content"] if params.logprobs else []
    status = final_status(out.finish_reason)
    item = shapes.item(status, [shapes.part(out.text, logprobs)])
    return shapes.response(status, [item], out.completion_tokens, finish_reason=out.finish_reason)


async def _in_our_words(work):
    """The generator's refusals in this route's field names: its input and max_output_tokens (the engine speaks
    of a prompt and max_tokens)."""
    try:
        return await work
    except Invalid as exc:
        message = str(exc)
        if message.startswith("the prompt has "):                  # (its size limit)
            message = "the input has " + message.removeprefix("the prompt has ")
        elif "exceeds the context limit" in message:
            message = message.replace("prompt (", "input (", 1).replace("max_tokens (", "max_output_tokens (", 1)
        else:
            raise
        raise Invalid(message, status=exc.status) from exc


def _delta_logprobs(entry: dict) -> dict:
    """A streamed delta's log-probability entry: OpenAI's leaves the bytes out there."""
    return {"token": entry["token"], "logprob": entry["logprob"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in entry["top_logprobs"]]}


async def _events(shapes: _Shapes, stream, tokens: TokenText, with_logprobs: bool):
    """(event type, payload) of a streamed response, in OpenAI's order."""
    where = {"item_id": shapes.item_id, "output_index": 0, "content_index": 0}
    yield "response.created", {"response": shapes.response("in_progress", [])}
    yield "response.in_progress", {"response": shapes.response("in_progress", [])}
    yield "response.output_item.added", {"output_index": 0, "item": shapes.item("in_progress", [])}
    yield "response.content_part.added", {**where, "part": shapes.part("", [])}
    text, logprobs, generated, reason = [], [], 0, "stop"
    try:
        async for piece in stream:
            if piece.finish_reason == "error":
                error = {"code": "invalid_prompt" if piece.error_status < 500 else "server_error",
                         "message": piece.error or "generation failed"}
                yield "response.failed", {"response": shapes.response("failed", [], error=error)}
                return
            token = generated_token(piece)
            entries = []
            if token is not None:
                generated += 1
                if with_logprobs:
                    entries = tokens.chat(*([t] for t in token))["content"]
                    logprobs += entries
            if piece.text or entries:
                text.append(piece.text)
                yield "response.output_text.delta", {**where, "delta": piece.text,
                                                     "logprobs": [_delta_logprobs(e) for e in entries]}
            if piece.finish_reason:
                reason = piece.finish_reason
    finally:
        await stream.aclose()
    whole, status = "".join(text), final_status(reason)
    part = shapes.part(whole, logprobs)
    yield "response.output_text.done", {**where, "text": whole, "logprobs": [_delta_logprobs(e) for e in logprobs]}
    yield "response.content_part.done", {**where, "part": part}
    item = shapes.item(status, [part])
    yield "response.output_item.done", {"output_index": 0, "item": item}
    yield f"response.{status}", {"response": shapes.response(status, [item], generated, finish_reason=reason)}


def _sse(events) -> StreamingResponse:
    async def body():
        sequence = 0
        async for kind, payload in events:
            data: dict[str, Any] = {"type": kind, "sequence_number": sequence, **payload}
            sequence += 1
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")
