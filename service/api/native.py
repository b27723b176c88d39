"""TGI / LoRAX-shaped inference: `POST /generate`, `POST /generate_stream`, TGI's `POST /` (what
`huggingface_hub.InferenceClient(base_url=...)` and `lorax-client` call) and `GET /info`. The request fields
and what each means (honoured, or a 422 naming it) are in `tgi_params.py`, the response shapes in
`tgi_output.py`. `inputs` is checked and tokenised as a completion prompt is (`prompts.py`); with `truncate`
only its last tokens are kept, as in TGI. A stream's last event carries the generated text and the details;
a sequence that fails in the engine ends its stream with TGI's error event `{"error", "error_type"}`."""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import replace
from typing import Optional

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse

from service.generation import TextOptions, merged

from .deps import InferenceCaller, StateDep
from .disconnect import cancel_on_disconnect
from .json_route import JsonRoute
from .prompts import encode_prompt, max_prompt_bytes, text_bytes
from .tgi_output import Output, info as info_body
from .tgi_adapters import resolve_target
from .tgi_params import GenerateRequest, refuse_unsupported, sampling

router = APIRouter(route_class=JsonRoute)
SSE = {200: {"content": {"text/event-stream": {}}}}     # streaming routes answer with server-sent events
STOPPED = "the server stopped this request (it is shutting down); retry"


async def encode_inputs(state, inputs: str, truncate: Optional[int]) -> list[int]:
    if truncate is None:
        return await encode_prompt(state, inputs, "inputs")
    limit = max_prompt_bytes(state)      # the byte bound comes first, as for any prompt; then TGI keeps the end
    if len(inputs) > limit or text_bytes(inputs, "inputs") > limit:
        raise HTTPException(400, f"inputs is over {limit} bytes (32 bytes per token of max_prompt_tokens="
                                 f"{state.settings.max_prompt_tokens})")
    ids = await asyncio.to_thread(state.loaded.tokenizer.encode, inputs)
    return state.generator.encode(ids[-truncate:])


async def _prepare(req: GenerateRequest, state, caller, stream: bool):
    if "stream" in req.model_fields_set and req.stream != stream:     # TGI reads it on `POST /` only
        route, other = ("/generate_stream", "/generate") if stream else ("/generate", "/generate_stream")
        raise HTTPException(422, f"stream: {str(req.stream).lower()} does not fit POST {route}, which "
                                 f"{'streams' if stream else 'answers once'}; use POST {other}, or POST / with stream")
    p = req.parameters
    refuse_unsupported(p, stream)
    adapter = resolve_target(p, state, caller)          # adapter_id or merged_adapters, and adapter_scale
    params, seed = sampling(p, state.settings, stream)
    return adapter, params, seed, await encode_inputs(state, req.inputs, p.truncate)


def _options(p) -> TextOptions:
    # TGI ends the text with the stop sequence; decoder_input_details: the prompt tokens' log-probabilities
    return TextOptions(p.stop or [], include_stop=True, prompt_logprobs=0 if p.decoder_input_details else None)


@router.post("/", responses=SSE)
async def root(req: GenerateRequest, state: StateDep, caller: InferenceCaller, request: Request,
               response: Response):
    """TGI's compatibility route: a list of one answer, or the stream."""
    if req.stream:
        return await generate_stream(req, state, caller, request)
    out = await generate(req, state, caller, request, response)
    return out if isinstance(out, Response) else [out]


@router.post("/generate")
async def generate(req: GenerateRequest, state: StateDep, caller: InferenceCaller, request: Request,
                   response: Response):
    """One sequence, or with `best_of` several sharing the batch (each with its own seed): the one whose
    tokens have the highest mean log-probability answers, the others are `details.best_of_sequences`.
    LoRAX's headers say which model and adapter answered and the token counts."""
    p = req.parameters
    adapter, params, seed, ids = await _prepare(req, state, caller, stream=False)
    seeds = [seed] + [secrets.randbits(63) for _ in range((p.best_of or 1) - 1)]
    streams = await cancel_on_disconnect(request, state.generator.start_all(
        [(ids, adapter, replace(params, seed=s)) for s in seeds], _options(p)))
    if isinstance(streams, Response):                # the client left while its request waited for a slot
        return streams
    outs = [Output(state, p, req.inputs, len(ids), s, ids) for s in seeds]

    async def run() -> dict:
        pieces = merged(streams)
        try:
            async for i, piece in pieces:
                if piece.finish_reason == "error":
                    raise piece.failure()
                if piece.finish_reason == "cancelled":
                    raise HTTPException(503, STOPPED)
                outs[i].add(piece)
        finally:
            await pieces.aclose()
        best = max(outs, key=lambda out: out.mean_logprob)
        generated = sum(len(out.tokens) for out in outs)
        response.headers.update({"x-model-id": state.model_id, "x-prompt-tokens": str(len(ids)),
                                 "x-generated-tokens": str(generated), "x-total-tokens": str(len(ids) + generated)})
        if not adapter.is_base:
            response.headers["x-adapter-id"] = adapter.name or ",".join(adapter.merge.ids)
        body = {"generated_text": best.generated_text}
        if p.details:
            body["details"] = best.details()
            if len(outs) > 1:
                body["details"]["best_of_sequences"] = [out.best_of_sequence() for out in outs if out is not best]
        return body
    return await cancel_on_disconnect(request, run())


@router.post("/generate_stream", responses=SSE)
async def generate_stream(req: GenerateRequest, state: StateDep, caller: InferenceCaller, request: Request):
    adapter, params, seed, ids = await _prepare(req, state, caller, stream=True)
    pieces = await cancel_on_disconnect(request, state.generator.start(ids, adapter, params,
                                                                       options=_options(req.parameters)))
    if isinstance(pieces, Response):                 # the client left while its request waited for a slot
        return pieces
    out = Output(state, req.parameters, req.inputs, len(ids), seed, ids)

    async def body():
        held = None                     # the token that reached max_new_tokens: its finish piece comes next
        async for piece in pieces:
            if piece.finish_reason in ("error", "cancelled"):
                message = piece.error or STOPPED
                yield _sse({"error": message, "error_type": "generation"})
                return
            token = out.add(piece) or held
            final = piece.finish_reason is not None
            if token is None:
                continue
            if not final and len(out.tokens) == params.max_tokens:
                held = token
                continue
            yield _sse(out.event(token, final))
            if final:
                return
    return StreamingResponse(body(), media_type="text/event-stream")


def _sse(event: dict) -> str:
    return f"data:{json.dumps(event)}\n\n"


@router.get("/info")
async def info(state: StateDep):
    """The model and the server's limits in TGI's and LoRAX's shape (no key needed, as `/health`)."""
    return info_body(state)
