"""vLLM's utility routes: `POST /tokenize` (a prompt, or chat messages through the template), `POST /detokenize`
and `GET /version`, in vLLM's shapes. Tokenising takes the same size limits and worker thread as a prompt
(`prompts.py`); `model`, when given, must be the base model or an adapter the caller may use (all share the
base model's tokenizer). Inference keys apply as on the OpenAI routes; `/version` is open, as in vLLM."""

from __future__ import annotations

import asyncio
from importlib import metadata
from typing import Any, Optional

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .deps import InferenceCaller, StateDep
from .json_route import JsonRoute
from .openai import resolve_adapter
from .openai_requests import Message
from .prompts import _check_size, encode_chat, text_bytes
from .tool_requests import template_tools, template_turns

router = APIRouter(route_class=JsonRoute)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = Field(None, min_length=1)
    add_special_tokens: Optional[bool] = None     # prompt: default true; messages: the template places them
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Optional[list[Any]] = None                   # messages only: as the chat route renders them
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: list[StrictInt]


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: StateDep, caller: InferenceCaller):
    adapter = resolve_adapter(state, caller, req.model) if req.model is not None else None
    if (req.prompt is None) == (req.messages is None):
        raise HTTPException(400, "give exactly one of prompt and messages")
    chat_only = [f for f in ("add_generation_prompt", "continue_final_message", "tools", "chat_template_kwargs")
                 if f in req.model_fields_set]
    if req.prompt is not None and chat_only:
        raise HTTPException(400, f"{chat_only[0]}: only with messages (a prompt is tokenised as given)")
    tokenizer = state.loaded.tokenizer
    if req.prompt is not None:
        _check_size(state, text_bytes(req.prompt, "prompt"), "prompt")
        ids = await asyncio.to_thread(tokenizer.encode, req.prompt, req.add_special_tokens is not False)
    else:
        if req.add_special_tokens:
            raise HTTPException(400, "add_special_tokens: not supported with messages (the chat template "
                                     "writes the special tokens)")
        tools = template_tools(req.tools, state.loaded.chat_template)
        ids = await encode_chat(state, template_turns(req.messages), tools=tools,
                                add_generation_prompt=req.add_generation_prompt,
                                variables=dict(req.chat_template_kwargs or {}),
                                continue_final_message=req.continue_final_message)
    virtual = (state.registry.get(adapter).virtual_tokens or 0) if adapter is not None else 0
    return {"count": len(ids), "max_model_len": state.settings.max_seq_len - virtual, "tokens": ids,
            "token_strs": [tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, state: StateDep, caller: InferenceCaller):
    if req.model is not None:
        resolve_adapter(state, caller, req.model)
    vocab = state.engine.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise HTTPException(400, f"tokens: token id {bad} is not in [0, {vocab})")
    if len(req.tokens) > state.settings.max_seq_len:
        raise HTTPException(400, f"tokens: {len(req.tokens)} ids; the limit is {state.settings.max_seq_len}")
    text = await asyncio.to_thread(state.loaded.tokenizer.decode, req.tokens, False)
    return {"prompt": text}


@router.get("/version")
def version():
    try:
        return {"version": metadata.version("adapter-serving")}
    except metadata.PackageNotFoundError:
        return {"version": "0.1.0"}
