"""Stop sequences on streamed text: the answer ends just before the first stop string, which is never shown.

Text arrives in detokenizer pieces, and a stop string may straddle several of them ("...\\n\\nQ" + "uestion:"),
so a tail that could still become a stop string is held back until the next piece decides it.
"""

from __future__ import annotations

from collections.abc import Sequence


def held_suffix(text: str, needles: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start (not the whole) of one of `needles`."""
    best = 0
    for needle in needles:
        for k in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:k]):
                best = k
                break
    return best


def first_match(text: str, needles: Sequence[str]) -> tuple[int, str] | None:
    """(index, needle) of the earliest needle in `text`; at one index, the longest needle."""
    found = [(i, -len(n), n) for n in needles if (i := text.find(n)) >= 0]
    if not found:
        return None
    i, _, needle = min(found)
    return i, needle


class StopMatcher:
    """Feed answer text piece by piece; what comes back is safe to show. Once a stop string is found,
    `matched` names it and nothing more is returned."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.matched: str | None = None
        self._held = ""

    def push(self, text: str) -> str:
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hit = first_match(buf, self.stops)
        if hit is not None:
            self.matched, self._held = hit[1], ""
            return buf[:hit[0]]
        keep = held_suffix(buf, self.stops)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The held tail, once no more text will come (it was not a stop string after all)."""
        out, self._held = ("" if self.matched is not None else self._held), ""
        return out
