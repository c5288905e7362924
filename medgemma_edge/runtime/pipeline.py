"""The composed pipeline: an image encoder and a decoder, meeting only through embeddings.

The pipeline holds what is shared by every caller (weights, tokenizer, the bounded image cache)
and no conversation state: each conversation brings its own `PromptCache` (`new_cache()`). Calls
without one use a scratch cache that is cleared first, so nothing carries over between them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import ImageInput, resize_square
from medgemma_edge.runtime.caches import Atom, ImageCache, ImageSpan, PromptCache, token_ids
from medgemma_edge.runtime.protocols import Decoder, DecoderModel, ImageEncoder, Tokenizer
from medgemma_edge.runtime.template import Control, ImageSlot, Markers, Part, merged, render_prompt, render_raw

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFacts:
    """What the manifest says about prompts: image size and tokens, stop ids, image markers."""

    image_size: int
    tokens_per_image: int
    eos_ids: frozenset[int]
    markers: Markers = field(default_factory=Markers)


class Pipeline:
    def __init__(self, decoder: DecoderModel, new_context: Callable[[], Decoder], tokenizer: Tokenizer,
                 encoder: ImageEncoder | None, facts: ModelFacts, info: dict[str, Any],
                 image_cache: ImageCache | None = None, owned: Sequence[Any] = (), spare: Decoder | None = None) -> None:
        self.decoder = decoder
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.facts = facts
        self.info = info  # bundle, artifact ids, load time: reported with every result
        self.image_cache = image_cache if image_cache is not None else ImageCache()
        self.encoder_calls = 0
        self._new_context = new_context
        self._owned = list(owned)  # native objects to free on close (e.g. a vocabulary-only model)
        self._spare = spare  # a context made at load time, handed to the first cache
        self._caches: list[PromptCache] = []
        self._scratch: PromptCache | None = None
        self._encode_lock = threading.Lock()  # one encoder, many callers

    # -- caches -------------------------------------------------------------------------------
    def new_cache(self) -> PromptCache:
        """A prompt cache of its own (one decoder context, created on first use), freed by close()."""
        cache = PromptCache(self._context)
        self._caches.append(cache)
        return cache

    def _context(self) -> Decoder:
        spare, self._spare = self._spare, None
        return spare if spare is not None else self._new_context()

    def cache_for(self, cache: PromptCache | None) -> PromptCache:
        """The caller's cache, or the scratch cache cleared of whatever an earlier call left in it."""
        if cache is not None:
            return cache
        if self._scratch is None:
            self._scratch = self.new_cache()
        self._scratch.clear()
        return self._scratch

    # -- images -------------------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput]) -> list[ImageSpan]:
        """Embeddings per image, from the cache when this encoder has seen these pixels before."""
        if images and self.encoder is None:
            raise UserError("this pipeline has no image encoder (text-only decoder); drop --image or load a bundle")
        spans = []
        for image in images:
            pixels = resize_square(image, self.facts.image_size)
            key = hashlib.sha256(pixels.tobytes()).hexdigest() + "|" + str(self.info.get("encoder_sha256")
                                                                          or self.info.get("encoder"))
            span = self.image_cache.get(key)
            if span is None:
                with self._encode_lock:
                    emb = self.encoder.encode(pixels)  # type: ignore[union-attr]
                    self.encoder_calls += 1
                if emb.shape[0] != self.facts.tokens_per_image:
                    raise UserError(f"the encoder produced {emb.shape[0]} tokens per image but the chat template "
                                    f"expects {self.facts.tokens_per_image}: encoder and decoder belong to different models")
                span = ImageSpan(key, emb)
                self.image_cache.put(span)
            spans.append(span)
        return spans

    # -- prompts ------------------------------------------------------------------------------
    def parts(self, prompt: str, n_images: int, system: str | None, raw: bool) -> list[Part]:
        if not raw:
            return render_prompt(prompt, n_images, system, self.facts.markers)
        if n_images or system:
            raise UserError("raw prompts (no chat template) take no images and no system text")
        return render_raw(prompt)  # for base (pretrained, not instruction-tuned) models: text continuation

    def atoms(self, parts: Sequence[Part], spans: Sequence[ImageSpan]) -> list[Atom]:
        """Text runs tokenized as plain text, control tokens by id, image slots as their spans."""
        atoms: list[Atom] = []
        for part in merged(parts):
            if isinstance(part, str):
                atoms += self.tokenizer.tokenize(part)
            elif isinstance(part, Control):
                atoms.append(part.id)
            elif isinstance(part, ImageSlot):
                atoms.append(spans[part.index])
        return atoms

    def prompt_logits(self, prompt: str, images: Sequence[ImageInput] = (), system: str | None = None,
                      raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Logits at every position of the chat-templated prompt: ids [n], logits [n, vocab] float32.

        `ids` holds 262144 (`<image_soft_token>`) at each position an image embedding filled.
        """
        atoms = self.atoms(self.parts(prompt, len(images), system, raw), self.encode_images(images))
        logits = self.cache_for(None).eval(atoms, all_logits=True)
        return np.asarray(token_ids(atoms), dtype=np.int64), logits.astype(np.float32, copy=False)

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Free every context, the encoder and the weights now, not whenever the collector runs."""
        for cache in self._caches:
            cache.close()
        self._caches, self._scratch = [], None
        if self._spare is not None:
            self._spare.close()
            self._spare = None
        for part in (self.encoder, self.decoder, *self._owned):
            if part is not None:
                part.close()
        self._owned = []

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
