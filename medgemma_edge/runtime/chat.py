"""A multi-turn conversation about images: a doctor asks several questions about one study.

Each turn re-renders the whole conversation (so the prompt is exactly what a fresh session would
see), and the caches make that cheap: the pipeline's image cache encodes nothing it has seen, and
the session's own prompt cache is reused up to where the new prompt differs (normally: the new turn).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from medgemma_edge.inputs.images import ImageInput
from medgemma_edge.runtime.generate import GenerationChunk, GenerationResult, collect, stream_parts
from medgemma_edge.runtime.pipeline import Pipeline
from medgemma_edge.runtime.sampling import SamplingParams
from medgemma_edge.runtime.template import Turn, render_conversation


class ChatSession:
    def __init__(self, pipeline: Pipeline, system: str | None = None) -> None:
        self.pipeline = pipeline
        self.system = system
        self.turns: list[Turn] = []
        self.images: list[ImageInput] = []
        self.cache = pipeline.new_cache()

    def stream_ask(self, text: str, images: Sequence[ImageInput] = (),
                   sampling: SamplingParams | None = None) -> Iterator[GenerationChunk]:
        """Answer a user turn (with optional new images), chunk by chunk. The question and its answer
        join the history only once the stream is read to its end: a failed or abandoned turn leaves
        the session as it was."""
        turn, new_images = Turn("user", text, len(images)), list(images)
        parts = render_conversation([*self.turns, turn], self.system, self.pipeline.facts.markers)
        for chunk in stream_parts(self.pipeline, parts, [*self.images, *new_images], sampling or SamplingParams(),
                                  self.cache):
            if chunk.result is not None:
                self.turns += [turn, Turn("model", chunk.result.text)]
                self.images += new_images
            yield chunk

    def ask(self, text: str, images: Sequence[ImageInput] = (), sampling: SamplingParams | None = None) -> GenerationResult:
        return collect(self.stream_ask(text, images, sampling))

    def reset(self) -> None:
        """Forget the conversation (cached image embeddings stay: they depend only on pixels)."""
        self.turns, self.images = [], []
