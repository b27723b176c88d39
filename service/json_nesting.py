"""How deeply a JSON text nests, measured before it is parsed, so a hostile body never reaches the parser.

Python's `json` parser recurses once per `[` or `{`: a body of 100,000 brackets runs it ~1,000 frames deep
before it gives up with a RecursionError, and any finaliser the garbage collector runs at that depth fails
too (its file is not closed; its error goes to stderr as an "unraisable exception"). `MAX_JSON_DEPTH` is the
limit TGI's and LoRAX's routers parse with (serde_json's recursion limit, 128); no request or adapter config
of ours needs more than a handful of levels. The measure runs in C and numpy: strings are blanked with one
regular expression, every byte but the brackets is dropped, and the running sum of +1 / -1 over what is left
is the depth. Bodies with no more brackets than the limit, nearly all of them, are passed by two counts.
"""

from __future__ import annotations

import re

import numpy as np

MAX_JSON_DEPTH = 128

_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.S)        # a JSON string, escapes included
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")       # opener +1, closer -1 (int8)


class TooDeep(ValueError):
    """The text nests deeper than the limit; its message says how deep and the limit."""


def nesting_depth(raw: bytes | str) -> int:
    """The deepest nesting of `[` / `{` in a JSON text, not counting brackets inside strings (those of an
    unterminated string count; the parser refuses such text anyway)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets.translate(_STEP), dtype=np.int8).astype(np.int32)   # [n] +1 / -1
    return int(np.cumsum(steps).max(initial=0))


def check_depth(raw: bytes | str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise `TooDeep` when `raw` nests deeper than `limit`; cheap for texts with few brackets."""
    count = raw.count(b"[") + raw.count(b"{") if isinstance(raw, (bytes, bytearray)) else \
        raw.count("[") + raw.count("{")
    if count <= limit:
        return
    depth = nesting_depth(raw)
    if depth > limit:
        raise TooDeep(f"the JSON nests {depth} levels deep (objects or lists inside each other); at most "
                      f"{limit} are accepted")
