"""Stop strings, applied where the text is known: on the detokenised stream of one request.

`StopStringMatcher.feed(piece)` returns the text that is safe to emit now and whether a stop string was
hit. Text that could still be the start of a stop string is held back until it either completes one
(generation stops and the stop string is not emitted, as in OpenAI's API; with `include`, vLLM's
`include_stop_str_in_output`, the text ends with it) or can no longer match.

A request may name at most `MAX_STOP_STRINGS` (16) stop strings of at most `MAX_STOP_CHARS` (256)
characters each (`check_stops`, used by the request models: 422 naming `stop`). OpenAI allows 4; vLLM sets
no bound, and 500,000 of them made one request's every token cost seconds of the shared event loop. With
the bound, a token costs at most 16 substring searches over fewer than 512 characters plus, per stop string,
one suffix comparison per position where it could start.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from .utf8 import NotUnicode, utf8_size

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def check_stops(stop: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
    """`stop` as a request gave it, or ValueError naming the bound it breaks."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop string {i} has {len(s)} characters; the limit is {MAX_STOP_CHARS}")
        if not s:
            raise ValueError(f"stop string {i} is empty (as vLLM, an empty stop string is refused)")
        try:
            utf8_size(s)
        except NotUnicode as exc:               # could never match decoded text
            raise ValueError(f"stop string {i} is not valid Unicode text ({exc})") from None
    return stop


class StopStringMatcher:
    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops = [s for s in stops if s]
        self.include = include
        self._held = ""
        self.stopped = False
        self.matched: Optional[str] = None      # the stop string that ended the text (vLLM's `stop_reason`)

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to emit, True once a stop string was found). After a stop, everything is ignored."""
        if self.stopped:
            return "", True
        text = self._held + piece
        hits = [(i, len(s), s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            start, length, self.matched = min(hits)       # the earliest; of those starting there, the shortest
            return text[:start + length if self.include else start], True
        keep = max((self._partial(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """The longest k < len(stop) such that `text` ends with stop[:k] (0 if none)."""
        if not text:
            return 0
        last = text[-1]
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop[k - 1] == last and text.endswith(stop[:k]):
                return k
        return 0

    def flush(self) -> str:
        """The held-back text, at the end of generation without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
