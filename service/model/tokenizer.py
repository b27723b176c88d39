"""`Tokenizer`: text <-> token ids for the served model, over a `tokenizers.Tokenizer`, plus `IncrementalDecoder`.

A Hugging Face folder brings its `tokenizer.json`, used as is (`from_file`). A GGUF carries only llama.cpp's
metadata (vocabulary, merges, token types, special ids, the `pre` tokenizer name); `from_gguf` rebuilds the
byte-level BPE from it the way transformers' GGUF path does (`integrations/gguf/gguf_tokenizer_mapping.py`:
tokens respelled into the byte alphabet, control tokens added as special, user-defined tokens as plain added
tokens, BOS/EOS by template) with one deliberate difference: the pre-tokenizer follows llama.cpp's table for
`tokenizer.ggml.pre`. transformers falls back to GPT-2's regex for names it does not list, such as "smollm",
whose vocabulary was trained with every digit isolated (llama.cpp and SmolLM2's own `tokenizer.json` split
`\\p{N}` first); pass `pre_tokenizer="default"` to get transformers' tokenisation exactly. `IncrementalDecoder`
turns a stream of generated ids into text pieces that never split a UTF-8 character (vLLM's and TGI's scheme).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# llama.cpp's `tokenizer.ggml.token_type` values
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the regex its merges were learned under (transformers' table, which is llama.cpp's).
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# GPT-2's regex after isolating every numeric character (llama.cpp's `"\\p{N}"` first pass for these names).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_GPT2 = ("default", "gpt-2", "gpt2")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level_pre_tokenizer(pre: Optional[str]) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp applies for this `tokenizer.ggml.pre` name."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre is not None and pre not in _GPT2:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known here; splitting with GPT-2's regex "
                      "as transformers does")
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode / decode for one model; special tokens by name and id; the ids that end generation."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, unk_token: Optional[str] = None, pad_token: Optional[str] = None,
                 eos_token_ids: Iterable[int] = ()):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        ids = {self.eos_token_id} | set(eos_token_ids)
        self._eos_token_ids = frozenset(i for i in ids if i is not None)

    @classmethod
    def from_file(cls, path: str, tokenizer_config: Optional[Mapping[str, Any]] = None,
                  eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """A `tokenizer.json` with its folder's `tokenizer_config.json` (special tokens, add_bos/eos_token)."""
        config = dict(tokenizer_config or {})
        backend = tokenizers.Tokenizer.from_file(path)
        names = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        if "add_bos_token" in config or "add_eos_token" in config:
            # transformers rebuilds the post-processor only when the config states either flag
            _set_template(backend, names["bos_token"] if config.get("add_bos_token") else None,
                          names["eos_token"] if config.get("add_eos_token") else None)
        return cls(backend, eos_token_ids=eos_token_ids, **names)

    @classmethod
    def from_gguf(cls, metadata: Any, pre_tokenizer: Optional[str] = None) -> "Tokenizer":
        """The byte-level BPE a GGUF describes. `metadata`: a `gguf.GGUFReader` or a dict of its values.

        `pre_tokenizer` overrides `tokenizer.ggml.pre` ("default" = GPT-2's regex, transformers' choice for
        names it does not list)."""
        if hasattr(metadata, "fields"):
            metadata = {key: field.contents() for key, field in metadata.fields.items()}
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
        tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ValueError("GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens is missing or empty)")
        types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or ()
        merges = [tuple(m.split(" ")) for m in metadata.get("tokenizer.ggml.merges", ())]
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        # a token written with characters outside the byte alphabet is respelled byte by byte, as transformers does
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                                  continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = byte_level_pre_tokenizer(pre_tokenizer or metadata.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        # control tokens outside the byte alphabet are llama.cpp mislabels; adding them would grow the vocabulary
        control = [AddedToken(t, normalized=False, special=True)
                   for t, token_type in zip(tokens, types) if token_type == _CONTROL and set(t) <= alphabet]
        if control:
            backend.add_special_tokens(control)
        user = [AddedToken(t, normalized=False, special=False)
                for t, token_type in zip(tokens, types) if token_type == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens(user)

        def token(key: str) -> Optional[str]:
            index = metadata.get(f"tokenizer.ggml.{key}")
            return spelled[index] if index is not None and 0 <= index < len(spelled) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        _set_template(backend, bos if metadata.get("tokenizer.ggml.add_bos_token", False) else None,
                      eos if metadata.get("tokenizer.ggml.add_eos_token", False) else None)
        # llama.cpp also stops on end-of-turn / end-of-message tokens
        stops = [metadata[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in metadata]
        return cls(backend, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
                   pad_token=token("padding_token_id"), eos_token_ids=stops)

    def with_eos_token_ids(self, ids: Iterable[int]) -> "Tokenizer":
        """The same tokenizer, also stopping on `ids` (e.g. a generation_config's eos_token_id list)."""
        return Tokenizer(self.backend, bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
                         pad_token=self.pad_token, eos_token_ids=self._eos_token_ids | set(ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens written in `text` (e.g. "<|im_start|>") become their ids.

        Through `encode_batch`, which releases the GIL while it works (`encode` holds it throughout), so a
        prompt tokenised in a worker thread does not stop the event loop."""
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # no clean_up_tokenization_spaces: transformers skips it for BPE models, the only kind served here
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(token_id)

    def save(self, path: str) -> None:
        """Write `tokenizer.json` (what `from_file` reads back)."""
        self.backend.save(path)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.token_to_id(self.pad_token)

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: the EOS token and the model's other stop ids."""
        return set(self._eos_token_ids)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special tokens by name, as transformers hands them to chat templates."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "unk_token": self.unk_token, "pad_token": self.pad_token}
        return {k: v for k, v in names.items() if v is not None}


def _set_template(backend: tokenizers.Tokenizer, bos: Optional[str], eos: Optional[str]) -> None:
    """transformers' `update_post_processor`: BOS before and / or EOS after each sequence."""
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


class IncrementalDecoder:
    """Feed generated ids one at a time; get back the text that is safe to show.

    Each step decodes a short window (the ids of the last emitted piece plus the new ones) and emits what
    the new ids added, unless the text ends in U+FFFD, i.e. a UTF-8 character still cut between tokens: that
    is held until a later token completes it (vLLM's `detokenize_incrementally`, TGI's `decode_token`), and
    a character still cut when the sequence ends (`max_tokens` reached in its middle) is dropped, as vLLM's
    detokenizer never emits it. Without `prompt_ids`, `"".join(pieces) + flush()` equals
    `tokenizer.decode(all_ids)` less such a trailing cut character. With them, the last few prompt ids give
    the first window its left context, so a sentencepiece tokenizer keeps the leading space of the first
    generated word, which a decode of the generated ids alone drops.
    """

    _CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids)[-self._CONTEXT:] if prompt_ids else []
        self._prefix = 0  # window start: the ids of the last piece emitted (or the prompt context)
        self._read = len(self._ids)  # ids before this are emitted

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is still cut)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back at the end of the stream, less a trailing character still cut (whose bytes
        decode as U+FFFD; a U+FFFD the model wrote as its last token goes with it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        seen = decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        text = decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if final:
            text = text.rstrip("\ufffd")
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen):]
