"""The composed pipeline: an image encoder and a decoder, meeting only through embeddings.

The pipeline holds what is shared by every caller (weights, tokenizer, the bounded image cache)
and no conversation state: each conversation brings its own `PromptCache` (`new_cache()`). Calls
without one use a scratch cache that is cleared first, so nothing carries over between them.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from medgemma_edge.errors import PromptTooLong, UserError
from medgemma_edge.inputs.images import ImageInput, resize_square
from medgemma_edge.inputs.limits import BYTES_PER_TOKEN
from medgemma_edge.runtime import memory
from medgemma_edge.runtime.caches import Atom, ImageCache, ImageSpan, PromptCache, token_ids
from medgemma_edge.runtime.protocols import Decoder, DecoderModel, ImageEncoder, Tokenizer
from medgemma_edge.runtime.template import Control, ImageSlot, Markers, Part, merged, render_prompt, render_raw

log = logging.getLogger(__name__)


def plain_text(text: str) -> str:
    """`text` itself, refused in one line when it cannot be UTF-8 (lone surrogates: bytes that were not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"the text is not valid UTF-8 (character {exc.start} came from bytes that are not UTF-8); "
                        f"save or type it as UTF-8") from None
    return text


def no_vision(where: str, consequence: str) -> UserError:
    """The one-line refusal for image input (or an encoder) on a text-only model."""
    return UserError(f"{where}: has no vision part (a text-only model), so {consequence}")


@dataclass(frozen=True)
class ModelFacts:
    """What the manifest says about prompts: image size and tokens, stop ids, image markers."""

    image_size: int
    tokens_per_image: int
    eos_ids: frozenset[int]
    markers: Markers = field(default_factory=Markers)
    n_ctx: int = 4096  # each context's length: prompts are bounded by it before they are tokenized
    vision_bytes_per_image: int = 0  # encoder activations per image (memory.vision_bytes_per_image): sizes batches


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
        self.encoder_calls = 0  # images the encoder has encoded (cache misses)
        self.encode_batch: int | None = None  # images per encoder call; None: from available memory (ONNX), 1 (mtmd)
        self.progress = False  # a progress bar on stderr while encoding several images (the CLI turns it on)
        self._new_context = new_context
        self._owned = list(owned)  # native objects to free on close (e.g. a vocabulary-only model)
        self._spare = spare  # a context made at load time, handed to the first cache
        self._caches: list[PromptCache] = []
        self._scratch: PromptCache | None = None
        self._encode_lock = threading.Lock()  # one encoder, many callers
        self.store: Any = None  # the persistent EmbeddingStore (--cache-dir), the second level behind image_cache

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
            where = str(self.info.get("bundle") or self.info.get("decoder_gguf") or "this model")
            if self.info.get("has_vision"):  # a multimodal bundle loaded with text_only=True
                raise UserError(f"{where}: loaded without an image encoder (text_only); load it with one to ask about images")
            raise no_vision(where, "it takes no images; drop --image")
        n = len(images)
        spans: list[ImageSpan | None] = [None] * n
        batch = self._batch_size()
        with tqdm(total=n, desc="encoding images", unit="image", file=sys.stderr, leave=False,
                  disable=not self.progress or n < 2) as bar:
            for start in range(0, n, batch):  # a batch at a time: only one batch of pixels is held
                todo: dict[str, tuple[list[int], np.ndarray]] = {}
                for i in range(start, min(start + batch, n)):
                    pixels = resize_square(images[i], self.facts.image_size)
                    key = hashlib.sha256(pixels.tobytes()).hexdigest() + "|" + str(
                        self.info.get("encoder_sha256") or self.info.get("encoder"))
                    spans[i] = self._cached(key) if key not in todo else None
                    if spans[i] is None:
                        todo.setdefault(key, ([], pixels))[0].append(i)
                if todo:
                    for key, emb in zip(todo, self._encode([p for _, p in todo.values()])):
                        span = ImageSpan(key, emb)
                        self.image_cache.put(span)
                        if self.store is not None:
                            self.store.put(key, emb)
                        for i in todo[key][0]:
                            spans[i] = span
                bar.update(min(start + batch, n) - start)
        return spans  # type: ignore[return-value]

    def _cached(self, key: str) -> ImageSpan | None:
        """The span from memory, else from the persistent store (checked when read; None when absent or corrupt)."""
        span = self.image_cache.get(key)
        if span is None and self.store is not None:
            emb = self.store.get(key)
            if emb is not None and emb.shape[0] == self.facts.tokens_per_image:
                span = ImageSpan(key, emb)
                self.image_cache.put(span)
        return span

    def _batch_size(self) -> int:
        if self.encode_batch:
            return self.encode_batch
        if not hasattr(self.encoder, "encode_batch"):  # mtmd encodes one image per call
            return 1
        providers = getattr(self.encoder, "providers", None) or ["CPU"]
        on_cpu = "CPU" in providers[0].upper()  # CPUExecutionProvider, OpenVINO:CPU:...
        return memory.encode_batch_size(self.facts.vision_bytes_per_image, memory.available_bytes(), on_cpu)

    def _encode(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Embeddings [tokens, hidden] per square image, in one encoder call when the encoder batches."""
        with self._encode_lock:
            if len(pixels) > 1 and hasattr(self.encoder, "encode_batch"):
                embs = list(self.encoder.encode_batch(np.stack(pixels)))  # type: ignore[union-attr]
            else:
                embs = [self.encoder.encode(p) for p in pixels]  # type: ignore[union-attr]
            self.encoder_calls += len(pixels)
        for emb in embs:
            if emb.shape[0] != self.facts.tokens_per_image:
                raise UserError(f"the encoder produced {emb.shape[0]} tokens per image but the chat template "
                                f"expects {self.facts.tokens_per_image}: encoder and decoder belong to different models")
        return embs

    # -- prompts ------------------------------------------------------------------------------
    def parts(self, prompt: str, n_images: int, system: str | None, raw: bool) -> list[Part]:
        if not raw:
            return render_prompt(prompt, n_images, system, self.facts.markers)
        if n_images or system:
            raise UserError("raw prompts (no chat template) take no images and no system text")
        return render_raw(prompt)  # for base (pretrained, not instruction-tuned) models: text continuation

    def atoms(self, parts: Sequence[Part], spans: Sequence[ImageSpan]) -> list[Atom]:
        """Text runs tokenized as plain text, control tokens by id, image slots as their spans."""
        texts = [p for p in merged(parts) if isinstance(p, str)]
        n_bytes = sum(len(plain_text(t).encode("utf-8")) for t in texts)
        if n_bytes > BYTES_PER_TOKEN * self.facts.n_ctx:  # bounded before the tokenizer allocates for it
            raise PromptTooLong(f"the prompt is {n_bytes:,} bytes, far more than a context of {self.facts.n_ctx} "
                                f"tokens can hold; shorten the prompt or raise --ctx")
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
