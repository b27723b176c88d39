"""`utf8_size`: a user's text's UTF-8 size, or `NotUnicode` naming what keeps it from being text.

Python strings may hold lone surrogates (JSON's `"\\ud800"` decodes to one), which no UTF-8 text contains: a
prompt holding one cannot be tokenised, a stop string holding one can never match decoded output. Both the
prompts' size check and the stop strings' check ask here, and say the same thing in their own words.
"""

from __future__ import annotations


class NotUnicode(ValueError):
    """Its message says where: "a lone surrogate '\\ud800' at character 3"."""


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8; NotUnicode if it holds a lone surrogate."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise NotUnicode(f"a lone surrogate {text[exc.start]!a} at character {exc.start}") from None
