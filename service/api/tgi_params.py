"""TGI / LoRAX request bodies, `{"inputs", "parameters", "stream"}`, and what they mean for the engine.

Every `parameters` field that TGI's and LoRAX's routers define, and that `text-generation`, `lorax-client` and
`huggingface_hub.InferenceClient` send, is declared here and is either honoured or refused with a 422 naming
it; any other field is a 422 too (`extra="forbid"`), so nothing is silently ignored. The clients send every
field, most as null, false or their default, so a field is refused only when it asks for something
(`watermark: true`, `decoder_input_details` with a stream, ...). `grammar` (TGI) and `response_format` (LoRAX) constrain the
output (structured_output.py). `sampling` turns the honoured ones into
the engine's `SamplingParams` following TGI's rules (sampling when `do_sample` or a warper is set; a seed chosen
and reported when sampling without one); `resolve_adapter` maps LoRAX's `adapter_id` + `adapter_source` onto
the registry (`merged_adapters` and `adapter_scale` become the request's target in tgi_adapters.py)."""

from __future__ import annotations

import os
import secrets
from typing import Annotated, Any, Optional

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.engine import SamplingParams
from service.engine.sampling import MAX_TOP_LOGPROBS
from service.model.stop_strings import check_stops
from service.registry import NotFound

from .errors import MAX_SHOWN, shown
from .structured_output import tgi_constraint

MAX_BEST_OF = 4            # sequences one best_of request may run (they share the engine's batch)
MAX_MERGED_IDS = 8         # adapters one merged_adapters request may merge
# LoRAX's adapter sources that this server's registry holds adapters from (`PUT /admin/adapters/{name}`).
SOURCES = ("hub", "local")


class MergedAdapters(BaseModel):
    """LoRAX's `merged_adapters`: registered LoRA adapters merged as PEFT's `add_weighted_adapter` merges them
    (service/registry/merged.py); `merge_strategy` null is linear, `majority_sign_method` null is total."""
    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[str] = Field(min_length=1, max_length=MAX_MERGED_IDS)
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(min_length=1, max_length=MAX_MERGED_IDS)
    merge_strategy: Optional[str] = None
    density: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)
    majority_sign_method: Optional[str] = None


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    adapter_id: Optional[str] = None
    adapter_source: Optional[str] = None
    merged_adapters: Optional[MergedAdapters] = None
    adapter_scale: Optional[float] = Field(None, allow_inf_nan=False, description="this server's: multiplies the "
                                           "adapter's LoRA delta (1 = as trained)")
    api_token: Optional[str] = None
    do_sample: Optional[bool] = False
    max_new_tokens: Optional[int] = Field(None, ge=1)
    ignore_eos_token: Optional[bool] = False
    repetition_penalty: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, allow_inf_nan=False)
    return_full_text: Optional[bool] = False
    stop: Optional[list[str]] = Field(None, description="at most 16 strings of 256 characters")
    seed: Optional[int] = Field(None, ge=0, lt=2**64)          # TGI's u64
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    truncate: Optional[int] = Field(None, ge=1)
    typical_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    best_of: Optional[int] = Field(None, ge=1)
    watermark: Optional[bool] = False
    details: Optional[bool] = False
    decoder_input_details: Optional[bool] = False
    top_n_tokens: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    return_k_alternatives: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)   # LoRAX's top_n_tokens
    grammar: Optional[dict[str, Any]] = None
    response_format: Optional[dict[str, Any]] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return check_stops(value or [])


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def _refusals(p: Parameters, stream: bool) -> list[tuple[str, bool, str]]:
    """(field, does this request ask for it, why it is refused)."""
    best_of = p.best_of or 1
    return [
        ("watermark", bool(p.watermark), "is not supported: watermarking is not implemented"),
        ("decoder_input_details", bool(p.decoder_input_details) and stream,
         "is not supported with a stream (as in TGI)"),
        ("decoder_input_details", bool(p.decoder_input_details) and not p.details, "needs details: true"),
        ("best_of", best_of > MAX_BEST_OF, f"may be at most {MAX_BEST_OF}"),
        ("best_of", best_of > 1 and stream, "above 1 is not supported with a stream (as in TGI)"),
        ("best_of", best_of > 1 and not sampled(p),
         "above 1 needs sampling: do_sample, or a temperature, top_k, top_p or typical_p (as in TGI)"),
        ("seed", best_of > 1 and p.seed is not None, "must not be set when best_of is above 1 (as in TGI)"),
        ("merged_adapters", p.merged_adapters is not None and p.adapter_id not in (None, ""),
         "and adapter_id are exclusive: name one adapter, or the adapters to merge (as in LoRAX)"),
        ("api_token", p.api_token is not None, "is not supported: adapters are not fetched per request, an admin "
         "registers them (PUT /admin/adapters/{name}); send this server's key as Authorization: Bearer"),
        ("top_n_tokens", bool(p.top_n_tokens) and not p.details and not stream, "needs details: true"),
        ("return_k_alternatives", bool(p.return_k_alternatives) and not p.details and not stream,
         "needs details: true"),
    ]


def refuse_unsupported(p: Parameters, stream: bool) -> None:
    """422 naming the first field this request asks for that the server does not do."""
    for field, asked, why in _refusals(p, stream):
        if asked:
            raise HTTPException(422, f"parameters.{field} {why}")


def sampled(p: Parameters) -> bool:
    """TGI's rule: sampling when asked or when a warper is set (temperature 0, which TGI refuses, is greedy)."""
    return p.temperature != 0 and bool(p.do_sample or p.temperature not in (None, 1.0) or p.top_k
                                       or p.top_p not in (None, 1.0) or p.typical_p not in (None, 1.0))


def resolve_adapter(p: Parameters, state, caller) -> Optional[str]:
    """The registered adapter `adapter_id` names (None: the base model). With LoRAX's `adapter_source`
    (`hub`, the default, or `local`) it may also be the hub repo id or the folder an adapter was registered
    from; other sources are 422, unknown adapters 404."""
    source, name = p.adapter_source, p.adapter_id
    if source is not None and source not in SOURCES:
        raise HTTPException(422, f"parameters.adapter_source {shown(source)} is not supported: this server serves "
                                 f"adapters registered from {' or '.join(SOURCES)} (PUT /admin/adapters/{{name}})")
    if name in (None, "", state.model_id):
        return None
    if len(name) > MAX_SHOWN:
        raise HTTPException(404, f"adapter {shown(name)} does not exist")
    try:
        found: Optional[str] = state.registry.get(name).name
    except NotFound:
        kind = source or "hub"                    # LoRAX's default source
        key, wanted = ("repo_id", name) if kind == "hub" else ("path", os.path.abspath(name))
        found = next((r.name for r in state.registry.list()
                      if r.source.get("type") == kind and r.source.get(key) == wanted), None)
    if found is None or not caller.may_use(found):
        raise HTTPException(404, f"adapter {shown(name)} does not exist")
    return found


def sampling(p: Parameters, settings, stream: bool) -> tuple[SamplingParams, Optional[int]]:
    """The engine's parameters and the seed to report (None when greedy)."""
    n = p.max_new_tokens or settings.default_max_tokens
    if n > settings.max_tokens_limit:
        raise HTTPException(400, f"parameters.max_new_tokens {n} exceeds the limit of {settings.max_tokens_limit}")
    sample = sampled(p)
    seed = (p.seed if p.seed is not None else secrets.randbits(63)) if sample else None
    top = p.top_n_tokens or p.return_k_alternatives or 0
    params = SamplingParams(max_tokens=n, temperature=(p.temperature or 1.0) if sample else 0.0,
                            top_p=p.top_p or 1.0, top_k=p.top_k or 0, typical_p=p.typical_p or 1.0, seed=seed,
                            frequency_penalty=p.frequency_penalty or 0.0, frequency_over_context=True,
                            repetition_penalty=p.repetition_penalty or 1.0, ignore_eos=bool(p.ignore_eos_token),
                            # TGI's tokens always carry their log-probability, streamed or in details, and
                            # best_of picks a sequence by them
                            logprobs=bool(p.details) or stream or (p.best_of or 1) > 1, top_logprobs=top,
                            constraint=tgi_constraint(p.grammar, p.response_format))
    return params, seed
