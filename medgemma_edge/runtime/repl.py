"""The chat loop behind `medgemma-edge chat`: slash commands, pending images, one answer per question.

It reads lines and writes through callbacks, so any front end (a terminal, a test, a pipe) drives it
the same way; a typo or an unreadable image is reported and the consultation goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import ImageInput
from medgemma_edge.runtime.chat import ChatSession
from medgemma_edge.runtime.generate import GenerationResult
from medgemma_edge.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

COMMANDS = ("/image PATH", "/reset", "/quit")


@dataclass
class ChatRepl:
    session: ChatSession
    sampling: SamplingParams
    prepare: Callable[[Sequence[Path]], list[ImageInput]]  # check (and render) image files
    question: Callable[[str, Sequence[Path]], str]  # the text sent for a question about these images
    write: Callable[[str], None]  # answer text, streamed
    note: Callable[[str], None]  # status and error lines
    answered: Callable[[str, Sequence[Path], GenerationResult], None] | None = None  # e.g. the audit log
    pending: list[Path] = field(default_factory=list)
    think: Callable[[str], None] | None = None  # reasoning, streamed apart from the answer (None: not shown)

    def feed(self, line: str | bytes) -> bool:
        """Handle one input line; False when the user asked to leave."""
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.note(f"error: this line is not valid UTF-8 (byte {exc.start}); retype it or set the "
                          f"terminal to UTF-8")
                return True
        text = line.strip()
        if text in ("/quit", "/exit"):
            return False
        if not text:
            return True
        if text == "/image" or text.startswith("/image "):
            self._attach(text[len("/image"):].strip())
        elif text == "/reset":
            self.session.reset()
            self.note("[new conversation]")
        elif text.startswith("/") and not text.startswith("//"):
            self.note(f"error: unknown command {text.split()[0]!r}; commands are {', '.join(COMMANDS)} "
                      f"(start a question with // to send a leading /)")
        else:
            self._ask(text[1:] if text.startswith("//") else text)
        return True

    def _attach(self, arg: str) -> None:
        if not arg:
            self.note("error: /image needs a path, e.g. /image cxr.png")
            return
        path = Path(arg)
        try:
            self.prepare([path])
        except UserError as exc:  # a typo must not end the consultation
            self.note(f"error: {exc}")
            return
        self.pending.append(path)
        self.note(f"[image {path.name} attached to the next question]")

    def _ask(self, text: str) -> None:
        paths, self.pending = self.pending, []
        try:
            question = self.question(text, paths)
            result = None
            thought = False
            for chunk in self.session.stream_ask(question, images=self.prepare(paths), sampling=self.sampling):
                if self.think and chunk.reasoning:
                    self.think(chunk.reasoning)
                    thought = True
                self.write(chunk.text)
                result = chunk.result or result
            self.write("\n")
            if thought and self.think:
                self.think("\n")
        except UserError as exc:  # e.g. context full or an unreadable image: report it, keep the session
            self.note(f"error: {exc}")
            return
        assert result is not None
        if self.answered:
            self.answered(question, paths, result)
        t = result.timings
        log.info("ttft %.0f ms (%d tokens reused), decode %.1f tok/s", t["time_to_first_token_ms"],
                 result.reused_tokens, t["decode_tokens_per_s"])
