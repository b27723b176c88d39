"""OpenAI-compatible inference: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (with `stream`).

`model` is the base model's id or an adapter's name, as in vLLM. Streaming answers are server-sent events
ending with `data: [DONE]`; if the client goes away, streaming or not, the request is cancelled and its batch
slot freed at the next engine step.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Optional, Union

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StrictBool, StrictInt, field_validator

from service.engine import SamplingParams
from service.model.stop_strings import check_stops

from .deps import InferenceCaller, State, StateDep
from .disconnect import cancel_on_disconnect
from .errors import MAX_SHOWN, shown
from .prompts import encode_chat, encode_prompt

router = APIRouter()
SSE = {200: {"content": {"text/event-stream": {}}}}     # `stream: true` answers with server-sent events


class _Common(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    # NaN and infinities are refused as "not a finite number" (JSON parsers here accept NaN / Infinity)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**64)     # what torch.Generator.manual_seed takes
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    stop: Optional[Union[str, list[str]]] = Field(None, description="at most 16 strings of 256 characters")
    stream: bool = False
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past end-of-sequence tokens")
    # One choice per request: asking for more is refused (422 naming the field) rather than ignored.
    n: int = Field(1, ge=1, le=1, description="number of choices; only 1 is supported")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return check_stops(value)

    @property
    def wants_logprobs(self) -> bool:
        return False


class CompletionRequest(_Common):
    prompt: Union[str, list[StrictInt]]              # strict: `[true, false]` is not a list of token ids
    max_tokens: Optional[int] = Field(16, ge=1)
    best_of: Optional[int] = Field(None, ge=1, le=1, description="only 1 (or null) is supported")
    # OpenAI's completions: an integer 0..5 (the sampled token's logprob is always returned)
    logprobs: Optional[int] = Field(None, ge=0, le=5, strict=True)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


class Message(BaseModel):
    role: str
    # null only where OpenAI allows it (an assistant turn that called tools); it renders as ""
    content: Optional[str] = ""

    @field_validator("content")
    @classmethod
    def _content(cls, value: Optional[str], info) -> Optional[str]:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("content may be null only in an assistant message")
        return value


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = None            # OpenAI's chat: a boolean

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)


def resolve_adapter(state: State, caller, model: str) -> Optional[str]:
    """None for the base model; the adapter name otherwise (404 if unknown or not visible to the caller)."""
    if model == state.model_id:
        return None
    if len(model) > MAX_SHOWN or not caller.may_use(model):
        raise HTTPException(404, f"model {shown(model)} does not exist")
    state.registry.get(model)
    return model


def sampling(state: State, req: _Common, max_tokens: Optional[int]) -> SamplingParams:
    s = state.settings
    n = max_tokens or s.default_max_tokens
    if n > s.max_tokens_limit:
        raise HTTPException(400, f"max_tokens {n} exceeds the limit of {s.max_tokens_limit}")
    return SamplingParams(max_tokens=n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          seed=req.seed, presence_penalty=req.presence_penalty,
                          frequency_penalty=req.frequency_penalty, logprobs=req.wants_logprobs,
                          ignore_eos=req.ignore_eos)


def stops(req: _Common) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def sse(chunks) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


@router.get("/v1/models")
def list_models(state: StateDep, caller: InferenceCaller):
    created = int(time.time())
    data = [{"id": state.model_id, "object": "model", "created": created, "owned_by": "adapter-serving",
             "root": state.model_id, "parent": None}]
    for record in state.registry.list():
        if record.served and caller.may_use(record.name):
            data.append({"id": record.name, "object": "model", "created": int(record.created_at),
                         "owned_by": "adapter-serving", "root": record.name, "parent": state.model_id})
    return {"object": "list", "data": data}


@router.post("/v1/completions", responses=SSE)
async def completions(req: CompletionRequest, state: StateDep, caller: InferenceCaller, request: Request):
    adapter = resolve_adapter(state, caller, req.model)
    params = sampling(state, req, req.max_tokens)
    ids = await encode_prompt(state, req.prompt)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        pieces = await state.generator.start(ids, adapter, params, stops(req))

        async def chunks():
            async for piece in pieces:
                yield {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                       "choices": [{"index": 0, "text": piece.text, "logprobs": None,
                                    "finish_reason": piece.finish_reason}]}
        return sse(chunks())
    out = await cancel_on_disconnect(request, state.generator.complete(ids, adapter, params, stops(req)))
    if isinstance(out, Response):
        return out
    logprobs = {"tokens": [state.loaded.tokenizer.decode([t], False) for t in out.token_ids],
                "token_logprobs": out.logprobs} if req.wants_logprobs else None
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens}}


@router.post("/v1/chat/completions", responses=SSE)
async def chat_completions(req: ChatRequest, state: StateDep, caller: InferenceCaller, request: Request):
    adapter = resolve_adapter(state, caller, req.model)
    params = sampling(state, req, req.max_completion_tokens or req.max_tokens)
    ids = await encode_chat(state, [{**m.model_dump(), "content": m.content or ""} for m in req.messages])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        pieces = await state.generator.start(ids, adapter, params, stops(req))

        async def chunks():
            yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            async for piece in pieces:
                yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                       "choices": [{"index": 0, "delta": {"content": piece.text} if piece.text else {},
                                    "finish_reason": piece.finish_reason}]}
        return sse(chunks())
    out = await cancel_on_disconnect(request, state.generator.complete(ids, adapter, params, stops(req)))
    if isinstance(out, Response):
        return out
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": out.finish_reason}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens}}
