"""A multi-turn conversation about images: a doctor asks several questions about one study.

Each turn re-renders the whole conversation (so the prompt is exactly what a fresh session would
see), and the pipeline's caches make that cheap: images already encoded are not encoded again, and
the KV cache is reused up to where the new prompt differs (normally: the new turn only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from medgemma_edge.chat import Turn, render_conversation
from medgemma_edge.preprocess import ImageInput

if TYPE_CHECKING:
    from medgemma_edge.pipeline import Generation, GenerationResult, Pipeline


class ChatSession:
    def __init__(self, pipeline: "Pipeline", system: str | None = None) -> None:
        self.pipeline = pipeline
        self.system = system
        self.turns: list[Turn] = []
        self.images: list[ImageInput] = []

    def ask(self, text: str, images: Sequence[ImageInput] = (), stream: bool = False,
            **sampling: Any) -> "GenerationResult | Generation":
        """Answer a user turn (with optional new images). The question and its answer join the history
        only once the answer is complete: a failed or abandoned turn leaves the session as it was."""
        turn, new_images = Turn("user", text, len(images)), list(images)
        parts = render_conversation([*self.turns, turn], self.system)
        gen = self.pipeline.run(parts, [*self.images, *new_images], stream=True, **sampling)
        recorded = _Recorded(gen, self, turn, new_images)
        if stream:
            return recorded  # type: ignore[return-value]
        for _ in recorded:
            pass
        return recorded.result  # type: ignore[return-value]

    def _answered(self, turn: Turn, images: list[ImageInput], result: "GenerationResult") -> None:
        self.turns += [turn, Turn("model", result.text)]
        self.images += images

    def reset(self) -> None:
        """Forget the conversation (cached image embeddings stay: they depend only on pixels)."""
        self.turns, self.images = [], []


class _Recorded:
    """A streamed answer that joins the session's history once fully read."""

    def __init__(self, gen: "Generation", session: ChatSession, turn: Turn, images: list[ImageInput]) -> None:
        self._gen, self._session, self._turn, self._images = gen, session, turn, images
        self.result: "GenerationResult | None" = None

    def __iter__(self) -> Iterator[str]:
        yield from self._gen
        self.result = self._gen.result
        if self.result is not None:
            self._session._answered(self._turn, self._images, self.result)
