"""Structured output: grammars that constrain a request's tokens, through llguidance.

A request's `SamplingParams.constraint` (a `Constraint`: a JSON schema, a regular expression, a list of choices
or a Lark grammar, with the request field it came from) becomes an llguidance grammar, compiled and checked
when the request is validated (an invalid one is a `ValueError` naming the field, before anything is queued;
a matcher per grammar text is cached as a template). Each running constrained request holds a `Guide` (a copy
of the template's `LLMatcher`). Once per engine step `Grammars.fill` computes the token masks of the
constrained requests that sample in that step, one after the other in the engine's thread (llguidance's
`LLExecutor` spreads them over threads, but on the 2-core machine, where the forward's threads hold the
cores, its median per step for 16 sequences ranged from 0.3 to 3.9 ms under load while one thread kept 0.30
ms), and each request's sampler puts the tokens its mask forbids at -inf before its other processors and
advances the matcher with the chosen token. Requests without a constraint never reach this code, so they share
the batch (and their adapters) with constrained ones at no cost. The grammar decides where the output may end:
end-of-sequence tokens are allowed only where the grammar accepts, and are the only tokens allowed once it is
complete; `max_tokens` still cuts a sequence with finish reason `length`. JSON schemas compile with fixed
separators (`", "`, `": "`) and no other whitespace, so a small model cannot loop on blank space; properties
come in the schema's order. llguidance was chosen after `bench/grammar_library_eval.py` (BENCHMARKS.md): no
dependencies, sub-millisecond compiles, ~0.5 ms of masks per step for 16 sequences.

A grammar can also fail while it runs: llguidance builds its lexer and parser lazily and stops at its own
limits (a regex like `b{999999}`: "too many expressions constructed" at the first token; 3,000 choices: "max is
2000" items in a parser row), and a grammar that matches nothing (`start: start`, a character class negating
every code point, a schema whose `$ref` requires itself) is in error before its first token, which `compile`
finds by computing the template's first mask (a 400 before anything is queued). A matcher in error allows only
end-of-sequence, so each mask and each consumed token is checked: a failure ends that request alone with
`GrammarFailed`, the client's error naming the field (never an empty "stop" the grammar did not accept), and
drops the template, whose copies share its lexer and would all fail the same way.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import llguidance
import numpy as np
import torch

from service.json_nesting import TooDeep, check_depth

from .grammar_tokenizer import for_llguidance

# JSON output without free whitespace (a schema's "x-guidance" options may still override these).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CACHED_GRAMMARS = 256
KINDS = ("json_schema", "regex", "choice", "grammar")


class GrammarFailed(RuntimeError):
    """A constrained request's grammar failed while generating (see the module docstring): the client's
    error, its message naming the request field."""


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: `kind` is one of `KINDS`; `value` the schema as JSON text, the
    regex, the choices as a JSON list or the Lark grammar; `field` the request field it came from (errors name
    it)."""
    kind: str
    value: str
    field: str

    @classmethod
    def json_schema(cls, schema: Any, field: str) -> "Constraint":
        """A JSON schema given as an object (or `true`, any value), or as JSON text (TGI and vLLM accept both)."""
        if isinstance(schema, str):
            try:
                check_depth(schema)
                schema = json.loads(schema)
            except TooDeep as exc:
                raise ValueError(f"{field}: {exc}") from None
            except ValueError as exc:
                raise ValueError(f"{field}: not valid JSON ({exc})") from None
        if schema is True:                     # JSON Schema's `true`: any value, as the empty schema
            schema = {}
        if schema is False:
            raise ValueError(f"{field}: the schema `false` matches nothing")
        if not isinstance(schema, dict):
            raise ValueError(f"{field}: a JSON schema must be an object")
        _check_integer_bounds(schema, field)
        return cls("json_schema", json.dumps(schema, sort_keys=False, separators=(",", ":")), field)

    @classmethod
    def regex(cls, pattern: Any, field: str) -> "Constraint":
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{field}: a regular expression must be a non-empty string")
        if (len(pattern) - len(pattern.rstrip("\\"))) % 2:   # llguidance reads a lone last backslash as nothing
            raise ValueError(f"{field}: the regular expression ends with a lone backslash (escape it as \\\\)")
        return cls("regex", pattern, field)

    @classmethod
    def choice(cls, choices: Any, field: str) -> "Constraint":
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise ValueError(f"{field}: must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(choices, ensure_ascii=False), field)

    @classmethod
    def grammar(cls, lark: Any, field: str) -> "Constraint":
        if not isinstance(lark, str) or not lark.strip():
            raise ValueError(f"{field}: a grammar must be a non-empty string (Lark syntax)")
        return cls("grammar", lark, field)

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's own form (not yet checked)."""
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":     # one literal per choice; JSON string escapes are Lark's
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(self.value))
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return llguidance.LLMatcher.grammar_from_lark(self.value)


class Guide:
    """One request's matcher of `constraint` and the mask of the tokens it allows next (None until computed)."""

    def __init__(self, matcher: llguidance.LLMatcher, grammars: "Grammars", constraint: Constraint):
        self.matcher, self.grammars, self.constraint = matcher, grammars, constraint
        self.allowed: Optional[np.ndarray] = None              # [V] bool
        self.any_allowed = False

    def _mask(self) -> np.ndarray:
        if self.allowed is None:                 # not filled by the engine's step (a sampler used on its own)
            self.grammars.fill([self])
        if self.matcher.is_error():              # its mask then allows end-of-sequence alone: not an answer
            raise self._failed("the grammar failed during generation")
        if not self.any_allowed:
            raise self._failed("the grammar allows no next token")
        return self.allowed

    def _failed(self, what: str) -> GrammarFailed:
        """The error ending this request; the template goes too (its copies share the state that failed)."""
        self.grammars.forget(self.constraint)
        return GrammarFailed(f"{self.constraint.field}: {what}" + _error(self.matcher))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Float logits [V] -> a copy with the tokens the grammar forbids at -inf."""
        return torch.where(torch.from_numpy(self._mask()), logits, float("-inf"))

    def greedy(self, logits: torch.Tensor) -> int:
        """The likeliest allowed token of logits [V], in numpy: torch's ops on a whole vocabulary run as
        parallel regions, each of which waits for both cores, and a 2-core machine that also runs the forward's
        threads made three of them per request and step cost more than the masks."""
        return int(np.where(self._mask(), _float32(logits), -np.inf).argmax())

    def advance(self, token: int) -> None:
        self.allowed = None
        if not self.matcher.consume_token(token) or self.matcher.is_error():
            raise self._failed(f"the grammar failed during generation at token {token}")


# llguidance 1.9's integer ranges: a bound within ~1,000 of -2**63 crashes the process (a stack overflow in its
# range-to-regex code), and bounds past the 64-bit range give values outside them; so integer bounds must lie
# within +-9e18 (97.6 % of the 64-bit range).
MAX_INTEGER_BOUND = 9 * 10**18
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _check_integer_bounds(schema: Any, field: str, path: str = "") -> None:
    """ValueError naming the first bound of an integer (or untyped) subschema past +-`MAX_INTEGER_BOUND`."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            _check_integer_bounds(item, field, f"{path}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind is None or kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        for key in _BOUNDS:
            bound = schema.get(key)
            if (isinstance(bound, (int, float)) and not isinstance(bound, bool)
                    and not abs(bound) <= MAX_INTEGER_BOUND):
                raise ValueError(f"{field}{path}.{key}: integer bounds must lie within +-{MAX_INTEGER_BOUND:.0e} "
                                 f"(the grammar engine's range); got {bound}")
    for key, value in schema.items():
        if isinstance(value, (dict, list)):
            _check_integer_bounds(value, field, f"{path}.{key}")


def _float32(logits: torch.Tensor) -> np.ndarray:
    """A logits row as float32 numpy (bfloat16 widened bit by bit, exactly)."""
    logits = logits.detach().cpu()
    if logits.dtype == torch.float32:
        return logits.numpy()
    if logits.dtype == torch.bfloat16:
        return (logits.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return logits.float().numpy()


def _error(matcher: llguidance.LLMatcher) -> str:
    error = matcher.get_error()
    return f": {_one_line(error)}" if error else ""


def _one_line(error: str) -> str:
    """llguidance's message on one line: its lines joined (a regex error's reason comes on the lines after
    "regex parse error:", the pattern with a caret under the fault, then the reason), blank ones dropped."""
    return " ".join(line.strip() for line in error.strip().splitlines() if line.strip())


class Grammars:
    """The grammar side of an engine: llguidance's view of the model's tokenizer (one tokenizer.json, the
    model's vocabulary size, its end-of-sequence ids), template matchers per grammar, and the batched mask computation."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
        eos = sorted(eos_token_ids)
        if not eos:
            raise ValueError("structured output needs the model's end-of-sequence token ids")
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32                     # int32 words of one bitmask row
        text = tokenizer.backend.to_str()
        try:
            self.tokenizer = llguidance.LLTokenizer(for_llguidance(text), n_vocab=vocab_size, eos_token=eos)
        except BaseException as exc:            # (a Rust panic is a BaseException)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            kind = (json.loads(text).get("model") or {}).get("type", "unknown")
            raise ValueError(f"the model's tokenizer ({kind}, {vocab_size} ids, end-of-sequence {eos}) cannot be "
                             f"used by the grammar engine (llguidance): {_one_line(str(exc))[:500]}; byte-level "
                             "and byte-fallback BPE tokenizers are supported") from None
        self._templates: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()

    def compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher of `constraint`'s checked grammar, kept (up to `MAX_CACHED_GRAMMARS`) as the template
        that requests copy; ValueError naming the constraint's field if the grammar is invalid."""
        key = (constraint.kind, constraint.value)
        template = self._templates.get(key)
        if template is not None:
            self._templates.move_to_end(key)
            return template
        try:
            grammar = constraint.llguidance_grammar()
        except ValueError as exc:
            raise ValueError(f"{constraint.field}: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        template = None if error else llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template is not None and not template.is_error():
            # its first mask (which copies then start from): a grammar matching nothing is in error by now
            bitmask = np.zeros(self.words, dtype=np.int32)
            template.unsafe_compute_mask_ptr(bitmask.ctypes.data, self.words * 4)
            if template.is_error() or not bitmask.any():
                error = "no text matches it" + _error(template).replace(":", " (llguidance:", 1) + (
                    ")" if template.is_error() else "")
        if template is None or template.is_error() or error:
            what = {"json_schema": "JSON schema", "regex": "regular expression", "choice": "choice list",
                    "grammar": "grammar"}[constraint.kind]
            detail = _one_line(error or template.get_error()) or "unknown error"
            raise ValueError(f"{constraint.field}: invalid or unsupported {what}: {detail}")
        self._templates[key] = template
        if len(self._templates) > MAX_CACHED_GRAMMARS:
            self._templates.popitem(last=False)
        return template

    def guide(self, constraint: Constraint) -> Guide:
        """A new request's guide: a copy of the template (cheaper than a new matcher, and its first masks too)."""
        return Guide(self.compile(constraint).deep_copy(), self, constraint)

    def forget(self, constraint: Constraint) -> None:
        """Drop `constraint`'s template (a copy of it failed): the next request compiles a fresh one."""
        self._templates.pop((constraint.kind, constraint.value), None)

    def fill(self, guides: Iterable[Optional[Guide]]) -> None:
        """Compute the next-token masks of `guides` (None entries skipped) in one batched call."""
        guides = [g for g in guides if g is not None]
        if not guides:
            return
        bitmask = np.zeros((len(guides), self.words), dtype=np.int32)          # [G, V/32], bit t = token t
        for i, guide in enumerate(guides):      # one thread: see the module docstring for why not LLExecutor
            guide.matcher.unsafe_compute_mask_ptr(bitmask[i].ctypes.data, self.words * 4)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :self.vocab_size]
        allowed = np.ascontiguousarray(bits).view(np.bool_)                    # [G, V], 0/1 bytes as bools
        nonempty = bitmask.any(axis=1)
        for i, guide in enumerate(guides):
            guide.allowed, guide.any_allowed = allowed[i], bool(nonempty[i])


def check_constraint(grammars: Optional[Grammars], constraint: Optional[Constraint]) -> None:
    """ValueError naming the field if `constraint` cannot be served (no grammars on the engine, or invalid)."""
    if constraint is not None:
        if grammars is None:
            raise ValueError(f"{constraint.field}: structured output is not available on this engine")
        grammars.compile(constraint)


def guide_for(grammars: Optional[Grammars], constraint: Optional[Constraint]) -> Optional[Guide]:
    """A new request's guide (None without a constraint)."""
    return grammars.guide(constraint) if constraint is not None else None
