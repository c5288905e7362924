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
from medgemma_edge.runtime.template import Item, Turn, render_conversation
from medgemma_edge.runtime.thinking import thinking_system


class ChatSession:
    def __init__(self, pipeline: Pipeline, system: str | None = None, thinking: bool = False) -> None:
        """`thinking`: every turn asks the model to think first (runtime/thinking.py); only the answers,
        never the reasoning, join the history the next turn sees."""
        self.pipeline = pipeline
        self.system = system
        self.thinking = thinking
        where = str(pipeline.info.get("bundle") or pipeline.info.get("decoder_gguf") or "this model")
        self._system = thinking_system(pipeline.tokenizer, system, where) if thinking else system
        self.turns: list[Turn] = []
        self.images: list[ImageInput] = []
        self.cache = pipeline.new_cache()

    def stream_ask(self, text: str, images: Sequence[ImageInput] = (), sampling: SamplingParams | None = None,
                   content: tuple[Item, ...] | None = None) -> Iterator[GenerationChunk]:
        """Answer a user turn (with optional new images), chunk by chunk. The question and its answer
        join the history only once the stream is read to its end: a failed or abandoned turn leaves
        the session as it was. `content`: the turn's items in order (a study, runtime/study_prompt.py),
        whose image items `images` fill; default: the text, then the images."""
        turn, new_images = Turn("user", text, len(images), content), list(images)
        parts = render_conversation([*self.turns, turn], self._system, self.pipeline.facts.markers)
        for chunk in stream_parts(self.pipeline, parts, [*self.images, *new_images], sampling or SamplingParams(),
                                  self.cache, thinking=self.thinking):
            if chunk.result is not None:
                self.turns += [turn, Turn("model", chunk.result.text)]
                self.images += new_images
            yield chunk

    def ask(self, text: str, images: Sequence[ImageInput] = (), sampling: SamplingParams | None = None,
            content: tuple[Item, ...] | None = None) -> GenerationResult:
        return collect(self.stream_ask(text, images, sampling, content))

    def reset(self) -> None:
        """Forget the conversation (cached image embeddings stay: they depend only on pixels)."""
        self.turns, self.images = [], []
