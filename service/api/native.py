"""TGI / LoRAX-shaped inference: `POST /generate`, `POST /generate_stream` and TGI's `POST /` with
`{"inputs", "parameters": {"adapter_id", "max_new_tokens", ...}}`. Numbers must be finite (TGI's router
refuses a temperature that is not strictly positive; NaN and Infinity are 422 here), stop strings are bounded
as on the OpenAI routes, and `inputs` is checked and tokenised as a completion prompt is
(`service/api/prompts.py`)."""

from __future__ import annotations

import json
from typing import Optional

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator

from service.engine import SamplingParams
from service.model.stop_strings import check_stops

from .deps import InferenceCaller, StateDep
from .disconnect import cancel_on_disconnect
from .errors import MAX_SHOWN, shown
from .prompts import encode_prompt

router = APIRouter()
SSE = {200: {"content": {"text/event-stream": {}}}}     # streaming routes answer with server-sent events


class Parameters(BaseModel):
    adapter_id: Optional[str] = None
    max_new_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**64)     # what torch.Generator.manual_seed takes
    repetition_penalty: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, allow_inf_nan=False)
    stop: list[str] = Field(default_factory=list, description="at most 16 strings of 256 characters")
    do_sample: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: Optional[bool] = False
    watermark: Optional[bool] = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return check_stops(value)


class GenerateRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


async def _prepare(req: GenerateRequest, state, caller):
    p = req.parameters
    adapter = p.adapter_id if p.adapter_id not in (None, "", state.model_id) else None
    if adapter is not None:
        if len(adapter) > MAX_SHOWN or not caller.may_use(adapter):
            raise HTTPException(404, f"adapter {shown(adapter)} does not exist")
        state.registry.get(adapter)
    s = state.settings
    n = p.max_new_tokens or s.default_max_tokens
    if n > s.max_tokens_limit:
        raise HTTPException(400, f"max_new_tokens {n} exceeds the limit of {s.max_tokens_limit}")
    sample = p.do_sample or (p.temperature not in (None, 0))
    params = SamplingParams(max_tokens=n, temperature=(p.temperature or 1.0) if sample else 0.0,
                            top_p=p.top_p or 1.0, top_k=p.top_k or 0, seed=p.seed,
                            frequency_penalty=p.frequency_penalty or 0.0, logprobs=p.details)
    return adapter, params, await encode_prompt(state, req.inputs, "inputs")


@router.post("/", responses=SSE)
async def root(req: GenerateRequest, state: StateDep, caller: InferenceCaller, request: Request):
    """TGI's compatibility route (what `huggingface_hub.InferenceClient(base_url=...)` calls)."""
    if req.stream:
        return await generate_stream(req, state, caller)
    out = await generate(req, state, caller, request)
    return out if isinstance(out, Response) else [out]


@router.post("/generate")
async def generate(req: GenerateRequest, state: StateDep, caller: InferenceCaller, request: Request):
    adapter, params, ids = await _prepare(req, state, caller)
    out = await cancel_on_disconnect(request, state.generator.complete(ids, adapter, params, req.parameters.stop))
    if isinstance(out, Response):
        return out
    body = {"generated_text": out.text}
    if req.parameters.details:
        body["details"] = {"finish_reason": out.finish_reason, "generated_tokens": out.completion_tokens,
                           "seed": req.parameters.seed, "prefill": [],
                           "tokens": [{"id": t, "text": state.loaded.tokenizer.decode([t], False), "logprob": lp,
                                       "special": False} for t, lp in zip(out.token_ids, out.logprobs)]}
    return body


@router.post("/generate_stream", responses=SSE)
async def generate_stream(req: GenerateRequest, state: StateDep, caller: InferenceCaller):
    adapter, params, ids = await _prepare(req, state, caller)
    pieces = await state.generator.start(ids, adapter, params, req.parameters.stop)

    async def body():
        text, count = [], 0
        async for piece in pieces:
            text.append(piece.text)
            count += piece.token_id is not None
            event = {"index": count, "token": {"id": piece.token_id if piece.token_id is not None else -1,
                                               "text": piece.text, "logprob": piece.logprob, "special": False},
                     "generated_text": None, "details": None}
            if piece.finish_reason:
                event["generated_text"] = "".join(text)
                event["details"] = {"finish_reason": piece.finish_reason, "generated_tokens": count,
                                    "seed": req.parameters.seed}
            yield f"data:{json.dumps(event)}\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")
