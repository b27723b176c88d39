"""Prompts to token ids, with every limit checked before the work and the work off the event loop.

A prompt's size is checked before it is tokenised: text may have at most `BYTES_PER_TOKEN` (32) UTF-8 bytes
per token of `max_prompt_tokens` (48 KiB for the default 1,536), a generous bound (English averages about 4
bytes per token, and a prompt over it could only fit in pathological cases such as long runs of whitespace),
so a 30 MB prompt is a 400 in microseconds instead of seconds of tokenising and gigabytes of token objects.
Text must be valid Unicode (a lone surrogate such as `"\\ud800"` is a 400 naming the field). A token-id
prompt is a list of at most `max_prompt_tokens` integers. Chat messages are checked the same way, their
contents together, before the template renders them. Rendering and tokenising then run in a worker thread
(the tokenizer releases the GIL), so `/health` and every other request keep being served meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional, Sequence

from fastapi import HTTPException

from service.model.chat_template import render_chat
from service.model.utf8 import NotUnicode, utf8_size

from .errors import shown

BYTES_PER_TOKEN = 32


def max_prompt_bytes(state) -> int:
    return BYTES_PER_TOKEN * state.settings.max_prompt_tokens


def text_bytes(text: str, field: str) -> int:
    """UTF-8 size of `text`; 400 naming `field` if it is not valid Unicode."""
    try:
        return utf8_size(text)
    except NotUnicode as exc:
        raise HTTPException(400, f"{field}: not valid Unicode text ({exc})") from None


def _check_size(state, size: int, field: str) -> None:
    limit = max_prompt_bytes(state)
    if size > limit:
        raise HTTPException(400, f"{field} is over {limit} bytes ({BYTES_PER_TOKEN} bytes per token of "
                                 f"max_prompt_tokens={state.settings.max_prompt_tokens})")


async def encode_prompt(state, prompt: str | list[int], field: str = "prompt") -> list[int]:
    """Token ids of a text or token-id prompt (400 naming `field` over a limit)."""
    if isinstance(prompt, list):
        if len(prompt) > state.settings.max_prompt_tokens:
            raise HTTPException(400, f"{field} has {len(prompt)} token ids; the limit is "
                                     f"{state.settings.max_prompt_tokens} (max_prompt_tokens)")
        vocab = state.engine.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:        # checked here too: `echo` decodes the prompt before the engine sees it
            raise HTTPException(400, f"{field}: token id {bad} is not in [0, {vocab})")
        return state.generator.encode(prompt)
    if len(prompt) > max_prompt_bytes(state):         # a character is at least a byte: no need to encode it
        _check_size(state, len(prompt), field)
    _check_size(state, text_bytes(prompt, field), field)
    return await asyncio.to_thread(state.generator.encode, prompt)


# template variables the request's own fields set: `chat_template_kwargs` may not replace them
OWN_VARIABLES = ("messages", "tools", "add_generation_prompt", "continue_final_message", "bos_token", "eos_token")


async def encode_chat(state, messages: Sequence[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None,
                      add_generation_prompt: bool = True, variables: Optional[dict[str, Any]] = None,
                      continue_final_message: bool = False, field: str = "messages") -> list[int]:
    """Token ids of the chat template rendered over `messages` (OpenAI-style dicts), `tools` (JSON-schema
    dicts) and vLLM's `chat_template_kwargs` (`variables`: more template variables, e.g. `enable_thinking`),
    tools and variables counted against the size limit with the messages; `continue_final_message`: the text
    ends inside the last message (the model continues it); `field` names the messages in errors."""
    if continue_final_message and add_generation_prompt:
        raise HTTPException(400, "continue_final_message: cannot be true with add_generation_prompt (true unless "
                                 "set false): the first continues the last message, the second starts a new one")
    loaded, variables = state.loaded, dict(variables or {})
    for name in variables:
        if name in OWN_VARIABLES or name in loaded.tokenizer.special_tokens:
            raise HTTPException(400, f"chat_template_kwargs.{shown(name)}: set by the request itself, not here")
    if not loaded.chat_template:
        raise HTTPException(400, "the base model has no chat template; use /v1/completions")
    limit, total = max_prompt_bytes(state), 0
    for i, message in enumerate(messages):
        for key, value in message.items():
            if isinstance(value, str):
                total += len(value) if len(value) > limit else text_bytes(value, f"{field}[{i}].{key}")
        if total > limit:
            _check_size(state, total, field)
    if tools or variables:
        _check_size(state, total + len(json.dumps(tools or [])) + len(json.dumps(variables, default=str)),
                    f"{field}, tools and chat_template_kwargs")

    def render_and_encode() -> list[int]:
        text = render_chat(loaded.chat_template, list(messages), add_generation_prompt=add_generation_prompt,
                           tools=tools, continue_final_message=continue_final_message, **variables,
                           **loaded.tokenizer.special_tokens)
        _check_size(state, text_bytes(text, "the rendered chat"), "the rendered chat")
        return state.generator.encode(text, add_special_tokens=False)
    return await asyncio.to_thread(render_and_encode)
