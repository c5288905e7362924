"""The prompt cache's prefix reuse and the image cache's bound, with a fake decoder that records its calls."""

from __future__ import annotations

import numpy as np
import pytest

from medgemma_edge.runtime.caches import ImageCache, ImageSpan, PromptCache, positions, token_ids
from medgemma_edge.runtime.template import IMAGE_TOKEN_ID

pytestmark = pytest.mark.unit

VOCAB = 8


class FakeDecoder:
    """Logits row i says how many positions the cache held after it: enough to check what was evaluated."""

    n_vocab, n_embd, n_ctx = VOCAB, 4, 1024

    def __init__(self) -> None:
        self.n_past = 0
        self.calls: list[tuple[str, int]] = []

    def reset(self) -> None:
        self.n_past = 0
        self.calls.append(("reset", 0))

    def truncate(self, n_keep: int) -> None:
        self.n_past = n_keep
        self.calls.append(("truncate", n_keep))

    def _rows(self, n: int, all_logits: bool) -> np.ndarray:
        start = self.n_past
        self.n_past += n
        rows = np.zeros((n, VOCAB), np.float32)
        rows[:, 0] = np.arange(start + 1, start + n + 1)
        return rows if all_logits else rows[-1:]

    def eval_tokens(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        self.calls.append(("tokens", len(tokens)))
        return self._rows(len(tokens), all_logits)

    def eval_embeddings(self, embd: np.ndarray, all_logits: bool = False) -> np.ndarray:
        self.calls.append(("image", len(embd)))
        return self._rows(len(embd), all_logits)

    def close(self) -> None:
        self.calls.append(("close", 0))


def _span(key: str, n: int = 3) -> ImageSpan:
    return ImageSpan(key, np.zeros((n, 4), np.float32))


def test_context_is_created_on_first_use_only() -> None:
    made: list[FakeDecoder] = []
    cache = PromptCache(lambda: made.append(FakeDecoder()) or made[-1])
    assert not made
    cache.eval([1, 2])
    cache.eval([3])
    assert len(made) == 1


def test_sync_reuses_the_shared_prefix_and_evaluates_only_the_rest() -> None:
    dec = FakeDecoder()
    cache = PromptCache(lambda: dec)
    img = _span("a")
    first = [2, 105, img, 106, 5]
    _, reused = cache.sync(first)
    assert reused == 0 and cache.atoms == first
    dec.calls.clear()
    second = [2, 105, _span("a"), 106, 5, 7, 7]  # same image by key: a new span object
    logits, reused = cache.sync(second)
    assert reused == positions(first)  # 7 positions: 4 tokens and the 3-token image
    assert dec.calls == [("truncate", 7), ("tokens", 2)]
    assert logits[-1, 0] == 9  # the decoder held all 9 positions when the last row came out


def test_a_changed_image_invalidates_from_there_on() -> None:
    dec = FakeDecoder()
    cache = PromptCache(lambda: dec)
    cache.sync([2, 105, _span("a"), 5])
    dec.calls.clear()
    _, reused = cache.sync([2, 105, _span("b"), 5])
    assert reused == 2 and dec.calls == [("truncate", 2), ("image", 3), ("tokens", 1)]


def test_the_last_atom_is_always_evaluated() -> None:
    dec = FakeDecoder()
    cache = PromptCache(lambda: dec)
    cache.sync([1, 2, 3])
    dec.calls.clear()
    logits, reused = cache.sync([1, 2, 3])  # identical prompt: its last logits must still come out
    assert reused == 2 and dec.calls == [("truncate", 2), ("tokens", 1)] and logits[-1, 0] == 3


def test_clear_and_close() -> None:
    dec = FakeDecoder()
    cache = PromptCache(lambda: dec)
    cache.sync([1, 2])
    cache.clear()
    assert cache.atoms == [] and ("reset", 0) in dec.calls
    cache.close()
    assert ("close", 0) in dec.calls and cache.atoms == []


def test_token_ids_mark_image_positions() -> None:
    assert token_ids([2, _span("a", 2), 9]) == [2, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 9]


def test_image_cache_is_bounded_lru() -> None:
    one = _span("x").embeddings.nbytes
    cache = ImageCache(max_bytes=2 * one)
    cache.put(_span("a"))
    cache.put(_span("b"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put(_span("c"))  # over the bound: b, the least recently used, goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.nbytes == 2 * one
    assert (cache.hits, cache.misses) == (3, 1)


def test_image_cache_keeps_the_newest_even_when_it_alone_is_over_the_bound() -> None:
    cache = ImageCache(max_bytes=1)
    cache.put(_span("big"))
    assert cache.get("big") is not None and len(cache) == 1
