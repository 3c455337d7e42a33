"""Token ids -> streamed text: incremental deltas and stop sequences (no torch here).

Shared by every ContextService implementation, so a streamed answer is cut the same way
whichever process generated its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextStream"]


class TextStream:
    """Token ids -> text deltas.

    Holds back a trailing incomplete UTF-8 character and any tail that could begin a stop
    sequence; at the first stop sequence the answer ends (the stop itself is left out).
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self._decode = decode
        self._stops = [stop for stop in stops if stop]
        self.text = ""  # the answer so far
        self.stopped = False
        self._sent = 0  # characters handed out

    def push(self, tokens: list[int]) -> str:
        """The new text that is safe to hand out after `tokens` (all tokens so far)."""
        text = self._decode(tokens)
        hits = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self._take(len(self.text))
        self.text = text
        safe = len(text) - max((_overlap(text, stop) for stop in self._stops), default=0)
        while safe > self._sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(safe)

    def flush(self) -> str:
        """Whatever was held back (the generation is over)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
