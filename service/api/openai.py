"""OpenAI-compatible inference: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (with `stream`).

`model` is the base model's id or an adapter's name, as in vLLM. Each choice (`n`, `best_of`) and each prompt
of a completions list is its own sequence in the engine's batch, submitted all or none; choice `i` of a
request with `seed` uses `seed + i`. Choices are indexed as OpenAI does (prompt `p`, choice `j`: `p * n + j`);
`best_of` keeps the `n` sequences of highest mean log-probability per token. Streaming answers are server-sent
events ending with `data: [DONE]` (with `stream_options.include_usage`, a last chunk with empty `choices`
carries the usage); a sequence that fails in the engine (non-finite logits, a grammar reaching its limits)
ends the stream with an error event, `data: {"error": {"message", "type", "code"}}`, then `data: [DONE]`, as
vLLM's streams do (the openai client raises `APIError` with that message; unstreamed, the request fails with
that status); if the client goes away, streaming or not, every sequence is cancelled and its batch slot
freed at the next engine step. Request bodies and their checks are in `openai_requests.py`; `tools` go to
chat templates that read them, and calls come back parsed for the formats `tool_calls.py` knows.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Optional

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse

from service.adapter_target import AdapterTarget
from service.generation import TextOptions, gather_all, merged
from service.model.chat_template import uses_variable
from service.registry import NotFound

from .deps import InferenceCaller, State, StateDep
from .disconnect import cancel_on_disconnect
from .errors import MAX_SHOWN, error_detail, shown
from .json_route import JsonRoute
from .logprobs import TokenText, joined
from .openai_requests import (MAX_SEQUENCES, ChatRequest, CompletionRequest, _Common, check_chat, check_completion,
                              choice_seed, sampling_params)
from .prompts import encode_chat, encode_prompt
from .tool_calls import parses_tool_calls, tool_calls
from .tool_requests import template_tools, template_turns

router = APIRouter(route_class=JsonRoute)
SSE = {200: {"content": {"text/event-stream": {}}}}     # `stream: true` answers with server-sent events


# `model` values that TGI's documentation ("tgi") and huggingface_hub's InferenceClient pointed at a URL ("dummy")
# send, on a server that ignores the field: the base model, unless an adapter has that name.
BASE_PLACEHOLDERS = ("tgi", "dummy")


def resolve_adapter(state: State, caller, model: Optional[str]) -> Optional[str]:
    """None for the base model (its id, no `model` at all as vLLM, or a TGI client's placeholder); the adapter
    name otherwise (404 if unknown or not visible to the caller)."""
    if model is None or model == state.model_id:
        return None
    if len(model) > MAX_SHOWN or not caller.may_use(model):
        raise HTTPException(404, f"model {shown(model)} does not exist")
    try:
        state.registry.get(model)
    except NotFound:
        if model in BASE_PLACEHOLDERS:
            return None
        raise
    return model


def max_tokens(state: State, requested: Optional[int], field: str = "max_tokens") -> int:
    s = state.settings
    n = requested if requested is not None else s.default_max_tokens
    if n > s.max_tokens_limit:
        raise HTTPException(400, f"{field} {n} exceeds the limit of {s.max_tokens_limit}")
    return n


def text_options(req: _Common) -> TextOptions:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return TextOptions(stops, req.include_stop_str_in_output, req.skip_special_tokens,
                       include_stop_token=req.include_stop_str_in_output)


def stream_error(piece) -> dict:
    """The event that ends a stream whose sequence failed (`piece.finish_reason` "error")."""
    return {"error": error_detail(piece.error_status, piece.error or "generation failed")}


def generated_token(piece) -> Optional[tuple]:
    """(id, log-probability, top) of the token a piece carries: its own, or the EOS / stop token that ended the
    sequence (counted in usage and listed in logprobs, as vLLM does); None for a piece of held-back text."""
    if piece.token_id is not None:
        return piece.token_id, piece.logprob, piece.top_logprobs
    return piece.stop_token


def ending(finish_reason: Optional[str], stop_reason) -> dict:
    """vLLM's `stop_reason` on a stream's last chunk of a choice (the stop string or `stop_token_ids` id that
    ended it; null for EOS, length and tool calls); the chunks before it leave the field out, as vLLM's do."""
    return {"stop_reason": stop_reason} if finish_reason is not None else {}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(chunks) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


def best(outs: list, n: int) -> list:
    """The `n` completions of highest mean log-probability per token (all of them when there are `n`)."""
    if len(outs) == n:
        return outs
    return sorted(outs, key=lambda o: -sum(o.logprobs) / max(len(o.logprobs), 1))[:n]


def tool_call_message(text: str, reason: str, streaming: bool = False, parallel: bool = True) -> tuple[dict, str]:
    """(the message or last delta, the finish reason) of a choice whose tool calls are parsed (`parallel`
    False: OpenAI's `parallel_tool_calls: false`, at most the first call)."""
    content, calls = tool_calls(text)
    calls = calls if parallel else calls[:1]
    message = {} if streaming else {"role": "assistant"}
    if content or not streaming:
        message["content"] = content
    if calls:
        message["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)] if streaming else calls
    return message, "tool_calls" if calls else reason


def model_cards(state: State, caller) -> list[dict]:
    """The base model and every served adapter the caller may use, in OpenAI's shape (with vLLM's `root`,
    `parent` and `max_model_len`: what is left for prompt and output, a prompt-learning adapter's virtual tokens
    taken off)."""
    length = state.settings.max_seq_len
    data = [{"id": state.model_id, "object": "model", "created": int(time.time()), "owned_by": "adapter-serving",
             "root": state.model_id, "parent": None, "max_model_len": length}]
    for record in state.registry.list():
        if record.served and caller.may_use(record.name):
            data.append({"id": record.name, "object": "model", "created": int(record.created_at),
                         "owned_by": "adapter-serving", "root": record.name, "parent": state.model_id,
                         "max_model_len": length - (record.virtual_tokens or 0)})    # (prompt learning's share)
    return data


@router.get("/v1/models")
async def list_models(state: StateDep, caller: InferenceCaller):
    return {"object": "list", "data": model_cards(state, caller)}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: StateDep, caller: InferenceCaller):
    """One model card (OpenAI's `models.retrieve`): 404 for a name that is not listed."""
    for card in model_cards(state, caller):
        if card["id"] == model:
            return card
    raise HTTPException(404, f"model {shown(model)} does not exist")


@router.post("/v1/completions", responses=SSE)
async def completions(req: CompletionRequest, state: StateDep, caller: InferenceCaller, request: Request):
    check_completion(req)
    adapter = AdapterTarget(resolve_adapter(state, caller, req.model), scale=req.adapter_scale)
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
        else [req.prompt]
    n, best_of = req.n, req.best_of or req.n
    if len(prompts) * best_of > MAX_SEQUENCES:
        raise HTTPException(400, f"prompt: {len(prompts)} prompts x {best_of} choices is over {MAX_SEQUENCES} "
                                 "sequences per request")
    scoring = req.max_tokens == 0            # vLLM's echo without generation: one token sampled, then dropped
    params = sampling_params(req, max_tokens(state, req.max_tokens) or 1, req.logprobs is not None or best_of > n,
                             req.logprobs or 0)
    ids = [await encode_prompt(state, p, f"prompt[{i}]" if len(prompts) > 1 else "prompt")
           for i, p in enumerate(prompts)]
    tokenizer = state.loaded.tokenizer
    echoes = [(p if isinstance(p, str) else tokenizer.decode(p, False)) if req.echo else "" for p in prompts]
    jobs = [(prompt_ids, adapter, dataclasses.replace(params, seed=choice_seed(req.seed, j)))
            for prompt_ids in ids for j in range(best_of)]
    prompt_tokens, options = sum(len(i) for i in ids), text_options(req)
    tokens = TokenText(tokenizer, req.return_tokens_as_token_ids)
    echo_logprobs = req.echo and req.logprobs is not None       # the prompt's tokens with their log-probabilities
    options.prompt_logprobs = req.logprobs if echo_logprobs else None
    options.scoring = scoring
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": req.model or state.model_id}
    if req.stream:
        streams = await cancel_on_disconnect(request, state.generator.start_all(jobs, options))
        if isinstance(streams, Response):            # the client left while its request waited for a slot
            return streams

        async def chunks():
            offsets, generated = [len(echoes[k // n]) for k in range(len(jobs))], 0
            started, pieces = set(), merged(streams)
            try:
                async for k, piece in pieces:
                    if piece.finish_reason == "error":
                        yield stream_error(piece)
                        return
                    text = piece.text if k in started else echoes[k // n] + piece.text
                    started.add(k)
                    logprobs = None
                    token = generated_token(piece)
                    if req.logprobs is not None and token is not None:
                        logprobs = tokens.completion(*([t] for t in token), [offsets[k]])
                    offsets[k] += len(piece.text)           # (the text this token completed)
                    if echo_logprobs and piece.prompt_logprobs is not None:
                        echoed = tokens.prompt_completion(ids[k // n], piece.prompt_logprobs, echoes[k // n])
                        logprobs = echoed if logprobs is None else joined(echoed, logprobs)
                    generated += token is not None
                    yield {**head, "choices": [{"index": k, "text": text, "logprobs": logprobs,
                                                "finish_reason": piece.finish_reason,
                                                **ending(piece.finish_reason, piece.stop_reason)}],
                           **({"usage": None} if req.include_usage else {})}
            finally:
                await pieces.aclose()
            if req.include_usage:
                yield {**head, "choices": [], "usage": usage(prompt_tokens, generated)}
        return sse(chunks())
    outs = await cancel_on_disconnect(request, gather_all(
        [state.generator.complete(prompt_ids, a, p, options=options) for prompt_ids, a, p in jobs]))
    if isinstance(outs, Response):
        return outs
    if scoring:                              # the sampled token is not part of the answer
        outs = [dataclasses.replace(o, text="", completion_tokens=0, token_ids=[], logprobs=[], top_logprobs=[],
                                    finish_reason="length", stop_reason=None) for o in outs]
    choices = []
    for p in range(len(prompts)):
        for j, out in enumerate(best(outs[p * best_of:(p + 1) * best_of], n)):
            logprobs = (tokens.completion(out.token_ids, out.logprobs, out.top_logprobs,
                                          tokens.offsets(out.token_ids, len(echoes[p]), len(out.text),
                                                         options.skip_special_tokens, ids[p]))
                        if req.logprobs is not None else None)
            if echo_logprobs:
                logprobs = joined(tokens.prompt_completion(ids[p], out.prompt_logprobs, echoes[p]), logprobs)
            choices.append({"index": p * n + j, "text": echoes[p] + out.text, "logprobs": logprobs,
                            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason})
    return {**head, "choices": choices, "usage": usage(prompt_tokens, sum(o.completion_tokens for o in outs))}


@router.post("/v1/chat/completions", responses=SSE)
async def chat_completions(req: ChatRequest, state: StateDep, caller: InferenceCaller, request: Request):
    check_chat(req)
    adapter = AdapterTarget(resolve_adapter(state, caller, req.model), scale=req.adapter_scale)
    field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    params = sampling_params(req, max_tokens(state, req.max_completion_tokens or req.max_tokens, field),
                             bool(req.logprobs), req.top_logprobs or 0)
    tools = template_tools(req.tools, state.loaded.chat_template, rendered=req.tool_choice != "none")
    messages = template_turns(req.messages)
    variables = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:      # as vLLM: for templates that read it (gpt-oss's and others)
        if not uses_variable(state.loaded.chat_template, "reasoning_effort"):
            raise HTTPException(400, "reasoning_effort: this model's chat template does not read it")
        variables.setdefault("reasoning_effort", req.reasoning_effort)
    ids = await encode_chat(state, messages, tools=tools if req.tool_choice != "none" else None,
                            add_generation_prompt=req.add_generation_prompt, variables=variables,
                            continue_final_message=req.continue_final_message)
    # the answer's role, as vLLM's: a new assistant turn, or the last message's when it is continued
    role = "assistant" if req.add_generation_prompt else messages[-1]["role"]
    echoed = messages[-1]["content"] if req.echo and messages[-1]["role"] == role else ""
    jobs = [(ids, adapter, dataclasses.replace(params, seed=choice_seed(req.seed, j)))
            for j in range(req.n)]
    options, tokens = text_options(req), TokenText(state.loaded.tokenizer, req.return_tokens_as_token_ids)
    # tool calls come back parsed when the template's format is known (tool_calls.py); held to the end then
    parse = bool(req.tools) and req.tool_choice != "none" and parses_tool_calls(state.loaded.chat_template)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model or state.model_id}
    extra = {"usage": None} if req.include_usage else {}
    if req.stream:
        streams = await cancel_on_disconnect(request, state.generator.start_all(jobs, options))
        if isinstance(streams, Response):            # the client left while its request waited for a slot
            return streams

        async def chunks():
            for k in range(req.n):
                yield {**head, "choices": [{"index": k, "delta": {"role": role, "content": ""},
                                            "logprobs": None, "finish_reason": None}], **extra}
            for k in range(req.n if echoed else 0):       # vLLM's echo: the last message's content first
                yield {**head, "choices": [{"index": k, "delta": {"content": echoed}, "logprobs": None,
                                            "finish_reason": None}], **extra}
            generated, held, pieces = 0, [""] * req.n, merged(streams)
            try:
                async for k, piece in pieces:
                    if piece.finish_reason == "error":
                        yield stream_error(piece)
                        return
                    logprobs, token = None, generated_token(piece)
                    if req.logprobs and token is not None:
                        logprobs = tokens.chat(*([t] for t in token))
                    generated += token is not None
                    delta, reason = {"content": piece.text} if piece.text else {}, piece.finish_reason
                    if parse:
                        held[k] += piece.text
                        delta = {}
                        if reason is not None:
                            delta, reason = tool_call_message(held[k], reason, streaming=True,
                                                              parallel=req.parallel_tool_calls is not False)
                    yield {**head, "choices": [{"index": k, "delta": delta, "logprobs": logprobs,
                                                "finish_reason": reason,
                                                **ending(reason, piece.stop_reason if reason == piece.finish_reason
                                                         else None)}], **extra}
            finally:
                await pieces.aclose()
            if req.include_usage:
                yield {**head, "choices": [], "usage": usage(len(ids), generated)}
        return sse(chunks())
    outs = await cancel_on_disconnect(request, gather_all(
        [state.generator.complete(prompt_ids, a, p, options=options) for prompt_ids, a, p in jobs]))
    if isinstance(outs, Response):
        return outs
    choices = []
    for k, out in enumerate(outs):
        message, reason = ({"role": role, "content": out.text}, out.finish_reason) if not parse \
            else tool_call_message(out.text, out.finish_reason, parallel=req.parallel_tool_calls is not False)
        message["role"] = role
        if echoed:
            message["content"] = echoed + (message.get("content") or "")
        choices.append({"index": k, "message": message, "finish_reason": reason,
                        "stop_reason": out.stop_reason if reason == out.finish_reason else None,
                        "logprobs": tokens.chat(out.token_ids, out.logprobs, out.top_logprobs) if req.logprobs else None})
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage(len(ids), sum(o.completion_tokens for o in outs))}
