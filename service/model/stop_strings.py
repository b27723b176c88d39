"""Stop strings, applied where the text is known: on the detokenised stream of one request.

`StopStringMatcher.feed(piece)` returns the text that is safe to emit now and whether a stop string was
hit. Text that could still be the start of a stop string is held back until it either completes one
(generation stops and the stop string is not emitted, as in OpenAI's API) or can no longer match.
"""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to emit, True once a stop string was found). After a stop, everything is ignored."""
        if self.stopped:
            return "", True
        text = self._held + piece
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            index = min(i for i, _ in hits)
            self.stopped, self._held = True, ""
            return text[:index], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of generation without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
