"""Thinking output: Google's system instruction, and a streaming splitter of reasoning from the answer.

MedGemma 27B and 1.5, asked with "SYSTEM INSTRUCTION: think silently if needed.", write
`<unused94>thought\\n ...reasoning... <unused95>` before the answer. Google's notebooks split the decoded
text on `<unused95>` and drop `<unused94>thought\\n` (quick_start_with_model_garden.ipynb,
quick_start_with_dicom.ipynb). The splitter does the same on the stream, at the token level and on the
text: marker tokens are recognised by id, marker text arriving in pieces ("<unu" + "sed95>") by
holding back a tail that could still become one. The markers themselves never reach the caller, with
or without thinking asked for (a model may think unprompted, as Google's CXR anatomy notebook notes).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

from medgemma_edge.errors import UserError
from medgemma_edge.runtime.stops import first_match, held_suffix

THINKING_INSTRUCTION = "SYSTEM INSTRUCTION: think silently if needed."
OPEN_TEXT, CLOSE_TEXT = "<unused94>", "<unused95>"
HEADER = "thought\n"  # what follows the opening marker; Google's code removes it with the marker


def with_thinking(system: str | None) -> str:
    """The system text asking for thinking: Google's instruction, then the caller's system text after one
    space (ref: quick_start_with_model_garden.ipynb, f"SYSTEM INSTRUCTION: think silently if needed.
    {system_instruction}"), or the instruction alone (ref: evaluate_on_medqa.ipynb). The Gemma 3 template
    then puts it at the head of the first user turn, followed by a blank line."""
    return f"{THINKING_INSTRUCTION} {system}" if system else THINKING_INSTRUCTION


@dataclass(frozen=True)
class ThinkingMarkers:
    """Token ids of `<unused94>` (opens a thought) and `<unused95>` (closes it); None where the vocabulary
    has no such control token."""

    open: int | None = None
    close: int | None = None

    @property
    def present(self) -> bool:
        return self.open is not None and self.close is not None


_lock = threading.Lock()
_found: "weakref.WeakKeyDictionary[Any, ThinkingMarkers]" = weakref.WeakKeyDictionary()


def thinking_markers(tokenizer: Any) -> ThinkingMarkers:
    """The marker ids in this tokenizer's vocabulary (Gemma 3: 100 and 101), looked up once."""
    with _lock:
        if tokenizer not in _found:
            lookup = getattr(tokenizer, "special_id", None)
            _found[tokenizer] = ThinkingMarkers(lookup(OPEN_TEXT), lookup(CLOSE_TEXT)) if lookup else ThinkingMarkers()
        return _found[tokenizer]


def thinking_system(tokenizer: Any, system: str | None, where: str) -> str:
    """`with_thinking(system)`, refused in one line when the model has no thinking tokens."""
    if not thinking_markers(tokenizer).present:
        raise UserError(f"{where}: this model's vocabulary has no thinking tokens ({OPEN_TEXT}, {CLOSE_TEXT}), "
                        f"so it cannot think aloud; drop --thinking")
    return with_thinking(system)


class ThinkingSplitter:
    """Feed (token, text piece) pairs; get back (reasoning, answer) text that is safe to show.

    - The answer after a thought starts at its first non-blank character.
    - A closing marker with no thought open, and an opening marker inside a thought, are dropped.
    - `in_thought` at the end: the model opened a thought and never closed it.
    """

    def __init__(self, markers: ThinkingMarkers = ThinkingMarkers()) -> None:
        self._markers = markers
        self.in_thought = False
        self.thought_seen = False
        self._held = ""
        self._header = False  # a thought just opened: "thought\n" may still be on its way
        self._trim = False  # a thought just closed: the answer's leading blanks are dropped

    def push(self, token: int | None, text: str) -> tuple[str, str]:
        if token is not None and token == self._markers.open:
            text = OPEN_TEXT  # control tokens detokenize to nothing; their place in the text matters
        elif token is not None and token == self._markers.close:
            text = CLOSE_TEXT
        return self._scan(self._held + text, final=False)

    def flush(self) -> tuple[str, str]:
        """What is held back, once the stream has ended."""
        return self._scan(self._held, final=True)

    def _scan(self, buf: str, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        answer: list[str] = []
        self._held = ""
        while buf:
            if self.in_thought and self._header:
                if not final and len(buf) < len(HEADER) and HEADER.startswith(buf):
                    self._held = buf  # "thou": the header may yet arrive whole
                    break
                self._header = False
                if buf.startswith(HEADER):
                    buf = buf[len(HEADER):]
                    continue
            needles = (CLOSE_TEXT, OPEN_TEXT)
            hit = first_match(buf, needles)
            keep = 0 if hit or final else held_suffix(buf, needles)
            end = hit[0] if hit else len(buf) - keep
            (reasoning if self.in_thought else answer).append(self._text(buf[:end]))
            if hit is None:
                self._held = buf[end:]
                break
            if hit[1] == OPEN_TEXT and not self.in_thought:
                self.in_thought = self.thought_seen = self._header = True
            elif hit[1] == CLOSE_TEXT and self.in_thought:
                self.in_thought, self._trim = False, True
            buf = buf[end + len(hit[1]):]
        return "".join(reasoning), "".join(answer)

    def _text(self, text: str) -> str:
        if self.in_thought or not self._trim:
            return text
        text = text.lstrip()
        self._trim = not text
        return text
