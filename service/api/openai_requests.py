"""Request bodies of the OpenAI routes, and the checks that turn them into sampling settings.

Every field OpenAI's API and vLLM's extensions define that this server honours is declared here; any other
field is refused (422 naming it, pydantic's `extra="forbid"`) rather than silently ignored, and fields
declared with values this server cannot honour (`suffix`, `tools` on a template without them, image or audio
content parts...) are refused with a 400 naming them. Structured output (`response_format`, vLLM's `guided_*`
and `structured_outputs`) becomes the engine's grammar constraint in `structured_output.py`. Limits: at most
`MAX_CHOICES` (16) choices (`n`, `best_of`), `MAX_SEQUENCES` (64) sequences per request (prompts x best_of),
logprobs 0..5 on completions and `top_logprobs` 0..20 on chat, `logit_bias` values in [-100, 100].
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from service.engine import SamplingParams
from service.engine.sampling import MAX_TOP_LOGPROBS
from service.model.stop_strings import check_stops

from .errors import shown
from .structured_output import StructuredOutputs, openai_constraint

MAX_CHOICES = 16
MAX_SEQUENCES = 64
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024          # entries (OpenAI documents no bound; each costs a scatter per token)

Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = Field(None, description="an adapter's name or the base model's id; none: the base model "
                                 "(vLLM's default)")
    max_tokens: Optional[int] = Field(None, ge=1)
    # NaN and infinities are refused as "not a finite number" (JSON parsers here accept NaN / Infinity)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, description="vLLM's extension; 0 or -1 = off")
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="vLLM's extension; 0 = off")
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**64)     # what torch.Generator.manual_seed takes
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False, description="vLLM's extension; 1 = off")
    logit_bias: Optional[dict[str, Bias]] = Field(None, max_length=MAX_LOGIT_BIAS)
    stop: Optional[Union[str, list[str]]] = Field(None, description="at most 16 strings of 256 characters")
    stop_token_ids: Optional[list[StrictInt]] = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past end-of-sequence tokens")
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: no EOS, stop token or stop string before")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices, each its own sequence in the batch")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, max_length=256, description="accepted (an end-user id); not stored")
    adapter_scale: float = Field(1.0, allow_inf_nan=False, description="this server's extension: multiplies the "
                                 "adapter's LoRA delta (1 = as trained, 0 = the base model)")
    # structured output (structured_output.py): OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any], bool]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = Field(None, description="a Lark grammar (llguidance's dialect)")
    structured_outputs: Optional[StructuredOutputs] = None
    return_tokens_as_token_ids: bool = Field(False, description="vLLM's extension: logprobs name tokens "
                                             "'token_id:<id>' (needs logprobs)")
    store: Optional[StrictBool] = Field(None, description="OpenAI's: false (or none) only; nothing is stored here")

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data):
        """An explicit null for a field with a default (`temperature`, `top_p`, `n`, `stream`, `echo`...) is that
        default, as OpenAI's schema (these fields are nullable) and vLLM take it; a required field stays required."""
        if isinstance(data, dict):
            defaulted = {name for name, f in cls.model_fields.items() if not f.is_required() and f.default is not None}
            return {k: v for k, v in data.items() if v is not None or k not in defaulted}
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return check_stops(value)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    # strict ints: `[true, false]` is not a list of token ids
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[int] = Field(16, ge=0, description="0 only with echo: the prompt scored, nothing generated")
    best_of: Optional[int] = Field(None, ge=1, le=MAX_CHOICES, description="sequences to choose n from")
    # OpenAI's completions: an integer 0..5 (the sampled token's logprob is always returned)
    logprobs: Optional[int] = Field(None, ge=0, le=5, strict=True)
    echo: bool = False
    suffix: Optional[str] = Field(None, description="refused unless null: no fill-in-the-middle")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    # null only where OpenAI allows it (an assistant turn that called tools); it renders as ""
    content: Optional[Union[str, list[dict[str, Any]]]] = ""
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _content(cls, value, info):
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("content may be null only in an assistant message")
        return value

    @model_validator(mode="after")
    def _content_given(self):
        if "content" not in self.model_fields_set and self.role != "assistant":     # as OpenAI: required there
            raise ValueError(f"content is required in a {shown(self.role)} message (only an assistant turn may "
                             "omit it)")
        return self


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = None            # OpenAI's chat: a boolean
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto"], dict[str, Any], str]] = None
    parallel_tool_calls: Optional[StrictBool] = Field(None, description="false: at most one tool call (OpenAI's)")
    add_generation_prompt: bool = Field(True, description="vLLM's extension")
    continue_final_message: bool = Field(False, description="vLLM's extension: the prompt ends inside the last "
                                         "message, which the model continues (needs add_generation_prompt false)")
    echo: bool = Field(False, description="vLLM's extension: the last message's content begins the answer when "
                       "the answer has that message's role")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(None, description="vLLM's extension: more variables "
                                                           "for the chat template (e.g. enable_thinking)")
    reasoning_effort: Optional[Literal["minimal", "low", "medium", "high"]] = Field(
        None, description="passed to a chat template that reads `reasoning_effort` (as vLLM), else 400")


def content_text(content, field: str, types: tuple[str, ...] = ("text",),
                 keys: tuple[str, ...] = ("type", "text")) -> str:
    """A message's content as text: a string, or its text parts (of `types`, with no key but `keys`) joined with
    newlines (vLLM's way); any other part type (image, audio, file...) is a 400 naming it."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in types:
            what = shown(kind) if isinstance(kind, str) else "without a type"
            raise HTTPException(400, f"{field}[{j}]: content parts of type {what} are not supported; "
                                     f"this server takes {' and '.join(types)} parts only")
        text = part.get("text")
        if not isinstance(text, str):
            raise HTTPException(400, f"{field}[{j}].text: a text part needs a string `text`")
        extra = next((key for key in part if key not in keys), None)
        if extra is not None:
            raise HTTPException(400, f"{field}[{j}].{shown(str(extra))}: not a key of a text part "
                                     f"({', '.join(keys)})")
        texts.append(text)
    return "\n".join(texts)


def check_common(req: _Common) -> None:
    if req.stream_options is not None and not req.stream:
        raise HTTPException(400, "stream_options: only allowed with stream: true")
    if req.store:
        raise HTTPException(400, "store: completions are not stored on this server; send store: false or leave it out")


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.return_tokens_as_token_ids and req.logprobs is None:
        raise HTTPException(400, "return_tokens_as_token_ids: needs logprobs")
    if req.suffix is not None:
        raise HTTPException(400, "suffix: not supported (no fill-in-the-middle)")
    if req.best_of is not None and req.best_of < req.n:
        raise HTTPException(400, f"best_of ({req.best_of}) must be at least n ({req.n})")
    if req.stream and (req.best_of or req.n) != req.n:
        raise HTTPException(400, "best_of: must equal n when streaming")
    if req.max_tokens == 0 and (not req.echo or req.stream):
        raise HTTPException(400, "max_tokens: 0 is taken only with echo and without stream (the prompt echoed and "
                                 "scored, nothing generated)")


def check_chat(req: ChatRequest) -> None:
    check_common(req)
    if req.top_logprobs and not req.logprobs:
        raise HTTPException(400, "top_logprobs: needs logprobs: true")
    if req.return_tokens_as_token_ids and not req.logprobs:
        raise HTTPException(400, "return_tokens_as_token_ids: needs logprobs: true")
    choice = req.tool_choice
    if choice is not None and not req.tools and choice != "none":
        raise HTTPException(400, "tool_choice: needs tools")
    if choice is not None and choice not in ("none", "auto"):
        raise HTTPException(400, f"tool_choice: {shown(str(choice))} is not supported (tool calls are not "
                                 "constrained; use \"auto\" or \"none\")")


def logit_bias(req: _Common) -> dict[int, float]:
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise HTTPException(400, f"logit_bias: key {shown(key)} is not a token id") from None
    return bias


def sampling_params(req: _Common, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=max(req.top_k, 0), min_p=req.min_p, seed=req.seed,
                          presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                          repetition_penalty=req.repetition_penalty, logit_bias=logit_bias(req),
                          min_tokens=req.min_tokens, stop_token_ids=list(req.stop_token_ids or []),
                          ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
                          constraint=openai_constraint(req))


def choice_seed(seed: Optional[int], index: int) -> Optional[int]:
    """Choice `index`'s seed: `seed + index` (wrapped into what torch takes), so each choice is reproducible."""
    if seed is None:
        return None
    value = seed + index
    return value - 2**64 if value >= 2**64 else value
