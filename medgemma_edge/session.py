"""A multi-turn conversation about images: a doctor asks several questions about one study.

Each turn re-renders the whole conversation (so the prompt is exactly what a fresh session would
see), and the pipeline's caches make that cheap: images already encoded are not encoded again, and
the KV cache is reused up to where the new prompt differs (normally: the new turn only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from medgemma_edge.chat import Turn, render_conversation
from medgemma_edge.preprocess import ImageInput

if TYPE_CHECKING:
    from medgemma_edge.pipeline import Generation, GenerationResult, Pipeline

log = logging.getLogger(__name__)


class ChatSession:
    def __init__(self, pipeline: "Pipeline", system: str | None = None) -> None:
        self.pipeline = pipeline
        self.system = system
        self.turns: list[Turn] = []
        self.images: list[ImageInput] = []

    def ask(self, text: str, images: Sequence[ImageInput] = (), stream: bool = False,
            **sampling: Any) -> "GenerationResult | Generation":
        """Add a user turn (with optional new images) and answer it; the answer joins the history."""
        self.turns.append(Turn("user", text, len(images)))
        self.images += list(images)
        parts = render_conversation(self.turns, self.system)
        gen = self.pipeline.run(parts, self.images, stream=True, **sampling)
        if stream:
            return _Recorded(gen, self)  # type: ignore[return-value]
        for _ in gen:  # type: ignore[union-attr]
            pass
        self._answered(gen.result)  # type: ignore[union-attr]
        return gen.result  # type: ignore[union-attr, return-value]

    def _answered(self, result: "GenerationResult | None") -> None:
        if result is not None:
            self.turns.append(Turn("model", result.text))

    def reset(self) -> None:
        """Forget the conversation (cached image embeddings stay: they depend only on pixels)."""
        self.turns, self.images = [], []


class _Recorded:
    """A streamed answer that joins the session's history once fully read."""

    def __init__(self, gen: "Generation", session: ChatSession) -> None:
        self._gen, self._session = gen, session
        self.result: "GenerationResult | None" = None

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self._gen
        self.result = self._gen.result
        self._session._answered(self.result)
