"""Chat templates: `render_chat` turns OpenAI-style messages into the prompt text the model was tuned on.

It renders the model's Jinja template the way transformers' `apply_chat_template(..., tokenize=False)`
does (`utils/chat_template_utils.py`): an `ImmutableSandboxedEnvironment` with `trim_blocks` and
`lstrip_blocks`, the loop-controls extension, a `tojson` filter that does not escape HTML or non-ASCII,
the `raise_exception` / `strftime_now` globals and guarded `dict` / `namespace`, messages with their
`None` values dropped and reasoning fields aliased, and the special tokens passed as variables. The
rendered text is meant to be encoded with `add_special_tokens=False`, as transformers does. Errors a
template raises, and a model without a template, come out as `ChatTemplateError` (a `ValueError`).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Optional

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The model has no chat template, or its template rejected the conversation."""


class ChatTemplateBroken(ChatTemplateError):
    """The model's chat template does not compile: the server's fault, not the request's (a 500; `check_template`
    says so at start)."""


def check_template(template: Optional[str]) -> Optional[str]:
    """None when `template` (if any) compiles, else what is wrong with it."""
    if not template:
        return None
    try:
        _compile(template)
    except ChatTemplateError as exc:
        return str(exc)
    return None


def render_chat(template: Optional[str], messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", tools: Optional[list[dict[str, Any]]] = None,
                continue_final_message: bool = False, **extra: Any) -> str:
    """The prompt text for `messages`; `extra` become template variables (e.g. `documents`, `enable_thinking`).
    `continue_final_message` (transformers' and vLLM's): the text ends inside the last message, right after its
    content, so the model continues it (an assistant turn started by the caller) instead of a new turn."""
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true: the first "
                                "continues the last message, the second starts a new one")
    if not template:
        raise ChatTemplateError("this model has no chat template; send a plain prompt to the completions endpoint")
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise ChatTemplateError("tools must be JSON-schema dicts")
    if not messages:
        raise ChatTemplateError("cannot apply the chat template to an empty conversation")
    chat = []
    for message in messages:
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    variables = {"bos_token": bos_token, "eos_token": eos_token, "documents": None, **extra}
    try:
        text = _compile(template).render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **variables)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from exc
    return _cut_after_final(text, chat[-1].get("content")) if continue_final_message else text


def _cut_after_final(text: str, final: Any) -> str:
    """The rendered chat cut right after the last message's content, as transformers' `apply_chat_template`
    cuts it for `continue_final_message`: at the last occurrence of the content (stripped); its trailing
    whitespace kept where the template kept it."""
    if isinstance(final, (list, tuple)):           # content parts: the last text part, as transformers
        final = next((part["text"] for part in reversed(final) if isinstance(part, dict) and "text" in part), None)
    if not isinstance(final, str) or not final.strip():
        raise ChatTemplateError("continue_final_message: the last message has no text to continue")
    if final.strip() not in text:
        raise ChatTemplateError("continue_final_message: the last message's content does not appear in the "
                                "rendered chat, so there is nothing to continue")
    at = text.rindex(final.strip())
    if text[at:at + len(final.lstrip())] == final:
        return text[:at + len(final.lstrip())]
    return text[:at + len(final.strip())]


def uses_variable(template: Optional[str], name: str) -> bool:
    """Whether `template` reads the variable `name` (e.g. `tools`: the template can show tools to the model)."""
    if not template:
        return False
    try:
        return name in jinja2.meta.find_undeclared_variables(_compile(template).environment.parse(template))
    except jinja2.TemplateError:
        return False


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own filter escapes HTML characters, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without handing them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed attribute names (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore-prefixed names ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for assistant masks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateBroken(f"the model's chat template does not compile: {exc} (line {exc.lineno})") from exc
