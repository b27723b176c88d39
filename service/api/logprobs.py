"""Log-probabilities in OpenAI's two response shapes, from the ids and log-probabilities the engine reports.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
"refusal": null}`. Completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
"text_offset"}`, where a position's `top_logprobs` holds the sampled token and the `logprobs` most likely
ones, and `text_offset` is where each token's text starts in the choice's text: the length of the text its
earlier tokens completed (a token that only starts a UTF-8 character adds nothing until one completes it, so
offsets never go back and never pass the text's end; vLLM's streamed offsets, where its non-streamed ones sum
the token strings' lengths, `"\ufffd"` for each cut piece); with `echo`, the prompt's tokens come first (the first
one's log-probability null), the completion's offsets after the echoed text.
A token's text is its own decoding (a piece of a UTF-8 character shows as U+FFFD); `bytes` are its exact
bytes for byte-level BPE vocabularies. With vLLM's `return_tokens_as_token_ids` a token is named
`"token_id:<id>"` instead (in `token`, `tokens` and the top entries; `bytes` and `text_offset` stay those of
its text). Log-probabilities of -inf become -9999.0, as vLLM writes them, since
JSON has no infinity.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

from service.model.tokenizer import IncrementalDecoder, Tokenizer, bytes_to_unicode

FLOOR = -9999.0
Top = Optional[Sequence[tuple[int, float]]]


@lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def finite(logprob: Optional[float]) -> Optional[float]:
    return None if logprob is None else (max(logprob, FLOOR) if not math.isnan(logprob) else FLOOR)


class TokenText:
    """Text and bytes of single tokens for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def name(self, token_id: int) -> str:
        """How a token is shown: its text, or `token_id:<id>` (vLLM's `return_tokens_as_token_ids`)."""
        return f"token_id:{token_id}" if self.as_ids else self.text(token_id)

    def bytes(self, token_id: int) -> list[int]:
        piece, table = self.tokenizer.id_to_token(token_id), _byte_of()
        if piece and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(self.text(token_id).encode("utf-8"))

    def chat_entry(self, token_id: int, logprob: Optional[float], top: Top) -> dict:
        return {"token": self.name(token_id), "logprob": finite(logprob), "bytes": self.bytes(token_id),
                "top_logprobs": [{"token": self.name(t), "logprob": finite(lp), "bytes": self.bytes(t)}
                                 for t, lp in (top or ())]}

    def chat(self, ids: Sequence[int], logprobs: Sequence[Optional[float]], tops: Sequence[Top]) -> dict:
        return {"content": [self.chat_entry(t, lp, top) for t, lp, top in zip(ids, logprobs, tops)], "refusal": None}

    def offsets(self, ids: Sequence[int], start: int, length: int, skip_special_tokens: bool,
                prompt_ids: Sequence[int] = ()) -> list[int]:
        """Where each of `ids` starts in a text whose `length` characters from `start` are their decoding (as
        `IncrementalDecoder` emits it after `prompt_ids`: a cut character counts once complete): non-decreasing,
        within the text (a stop string may have cut it short)."""
        decoder, done, out = IncrementalDecoder(self.tokenizer, skip_special_tokens, prompt_ids), 0, []
        for t in ids:
            out.append(start + min(done, length))
            done += len(decoder.push(t))
        return out

    def completion(self, ids: Sequence[int], logprobs: Sequence[Optional[float]], tops: Sequence[Top],
                   offsets: Sequence[int]) -> dict:
        """The completions shape for `ids`, each starting at its character of `offsets` in the choice's text."""
        tokens, top_dicts = [], []
        for t, lp, top in zip(ids, logprobs, tops):
            name = self.name(t)
            tokens.append(name)
            entry = {name: finite(lp)}
            for other, other_lp in top or ():
                entry.setdefault(self.name(other), finite(other_lp))
            top_dicts.append(entry)
        return {"tokens": tokens, "token_logprobs": [finite(lp) for lp in logprobs[:len(tokens)]],
                "top_logprobs": top_dicts, "text_offset": list(offsets[:len(tokens)])}

    def prompt_completion(self, ids: Sequence[int], entries: Sequence[Optional[tuple[float, Top]]],
                          echoed: str) -> dict:
        """The completions shape of an echoed prompt (its text `echoed`) from the engine's prompt
        log-probabilities: the first token's log-probability and top entry null (OpenAI's and vLLM's `echo` with
        `logprobs`)."""
        offsets = self.offsets(ids, 0, len(echoed), skip_special_tokens=False)
        rest = self.completion(ids[1:], [e[0] for e in entries[1:]], [e[1] for e in entries[1:]], offsets[1:])
        return {"tokens": [self.name(ids[0])] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
                "top_logprobs": [None] + rest["top_logprobs"], "text_offset": offsets[:1] + rest["text_offset"]}


def joined(first: dict, second: dict) -> dict:
    """Two completions-shaped logprobs objects one after the other (the echoed prompt, then the completion)."""
    return {key: first[key] + second[key] for key in first}
