"""Stop strings over a token stream: end before the stop text, leak no partial stop text.

Text arrives in pieces that may split a stop string across tokens. We hold back the longest
tail of the pending text that could still begin a stop string and release it only when it can't.
"""
from __future__ import annotations

from typing import Sequence

from engine.constrained.toolcalls.common import held_back


class StopMatcher:
    """Feed decoded text pieces; get back what is safe to emit and whether a stop string hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, piece: str) -> str:
        """Add `piece`; return the text that can be sent now (empty once stopped)."""
        if self.stopped:
            return ""
        text = self._pending + piece
        if not self.stops:
            return text
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        cut = min(hits)[0] if hits else -1
        if cut >= 0:
            self.matched = min(hits)[1]
            self.stopped = True
            self._pending = ""
            return text[:cut]
        keep = held_back(text, self.stops)
        self._pending = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation, release what was held back (it never became a stop)."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text
