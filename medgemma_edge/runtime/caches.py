"""The two caches that make follow-up questions cheap, both owned by the caller, never hidden:

- `ImageCache`: image embeddings keyed by pixel content + encoder artifact, bounded in bytes (LRU),
  shared by everyone holding the pipeline;
- `PromptCache`: what one decoder context (KV sequence) holds, reused up to the longest prefix a
  new prompt shares with it. A chat session keeps one per conversation, a server one per slot.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from medgemma_edge.runtime.protocols import Decoder
from medgemma_edge.runtime.template import IMAGE_TOKEN_ID

DEFAULT_IMAGE_CACHE_BYTES = 512 << 20  # 4B: ~200 images of 256 x 2560 float32


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """An image's embeddings [tokens, hidden] in a prompt; two spans are the same image if keys match."""

    key: str
    embeddings: np.ndarray

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageSpan) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __len__(self) -> int:
        return self.embeddings.shape[0]


Atom = Union[int, ImageSpan]  # one token id, or one whole image span (never split)


def positions(atoms: Sequence[Atom]) -> int:
    return sum(len(a) if isinstance(a, ImageSpan) else 1 for a in atoms)


def token_ids(atoms: Sequence[Atom]) -> list[int]:
    """Atoms as ids, with `<image_soft_token>` at every position an image embedding fills."""
    return [i for a in atoms for i in ([IMAGE_TOKEN_ID] * len(a) if isinstance(a, ImageSpan) else [a])]


class ImageCache:
    """Embeddings by key, least recently used dropped first once `max_bytes` is exceeded. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_IMAGE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._items: OrderedDict[str, ImageSpan] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageSpan | None:
        with self._lock:
            span = self._items.get(key)
            if span is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return span

    def put(self, span: ImageSpan) -> None:
        with self._lock:
            if span.key in self._items:
                return
            self._items[span.key] = span
            self._bytes += span.embeddings.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:  # the newest always stays
                _, old = self._items.popitem(last=False)
                self._bytes -= old.embeddings.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def _count(tally: dict[str, float] | None, kind: str, n: int, t0: float) -> None:
    if tally is not None:
        tally[f"{kind}_s"] = tally.get(f"{kind}_s", 0.0) + time.perf_counter() - t0
        tally[f"{kind}_n"] = tally.get(f"{kind}_n", 0) + n


class PromptCache:
    """One decoder context and the atoms its KV cache holds, in order.

    The context is created on first use, so a cache that is never used costs no memory.
    """

    def __init__(self, make_decoder: Callable[[], Decoder]) -> None:
        self._make = make_decoder
        self._decoder: Decoder | None = None
        self.atoms: list[Atom] = []

    @property
    def decoder(self) -> Decoder:
        if self._decoder is None:
            self._decoder = self._make()
        return self._decoder

    @property
    def n_ctx(self) -> int:
        return self.decoder.n_ctx

    def clear(self) -> None:
        if self._decoder is not None:
            self._decoder.reset()
        self.atoms = []

    def eval(self, atoms: Sequence[Atom], all_logits: bool = False, tally: dict[str, float] | None = None) -> np.ndarray:
        """Evaluate atoms after what the cache holds: token runs causally, image spans bidirectionally.

        `tally` accumulates seconds and positions per kind ("text_s", "text_n", "image_s", "image_n").
        """
        decoder = self.decoder
        outs: list[np.ndarray] = []
        run: list[int] = []
        for atom in [*atoms, None]:
            if isinstance(atom, int):
                run.append(atom)
                continue
            t0 = time.perf_counter()
            if run:
                outs.append(decoder.eval_tokens(run, all_logits))
                _count(tally, "text", len(run), t0)
                run = []
            t0 = time.perf_counter()
            if isinstance(atom, ImageSpan):
                outs.append(decoder.eval_embeddings(atom.embeddings, all_logits))
                _count(tally, "image", len(atom), t0)
        self.atoms += list(atoms)
        return np.concatenate([o for o in outs if len(o)])

    def shared_prefix(self, atoms: Sequence[Atom]) -> int:
        """How many leading atoms the cache already holds; the last atom is always evaluated (its logits)."""
        keep = 0
        for old, new in zip(self.atoms, atoms[:-1]):
            if old != new:
                break
            keep += 1
        return keep

    def sync(self, atoms: Sequence[Atom], tally: dict[str, float] | None = None) -> tuple[np.ndarray, int]:
        """Bring the cache to `atoms`, reusing the longest shared prefix; returns last logits and reused positions."""
        keep = self.shared_prefix(atoms)
        reused = positions(atoms[:keep])
        self.decoder.truncate(reused)
        self.atoms = self.atoms[:keep]
        return self.eval(atoms[keep:], all_logits=False, tally=tally), reused

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self.atoms = []
