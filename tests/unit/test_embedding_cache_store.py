"""The persistent embedding cache on its own: round trip, every kind of corrupt entry recomputed (never used),
LRU eviction within the byte bound, leftovers of killed writers, refusals of unusable folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from medgemma_edge import UserError
from medgemma_edge.runtime.embedding_store import EmbeddingStore

pytestmark = pytest.mark.unit


def emb(seed: int, rows: int = 16, cols: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def test_round_trip_is_bit_exact_and_keyed_by_the_whole_key(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "c")
    assert store.get("px|enc") is None and store.misses == 1
    store.put("px|enc", emb(0))
    got = store.get("px|enc")
    assert got is not None and got.dtype == np.float32 and np.array_equal(got, emb(0)) and got.flags.writeable
    assert store.get("px|other-encoder") is None  # the encoder artifact is half of the key
    assert (tmp_path / "c" / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert len(store) == 1 and store.stats() == {"hits": 1, "misses": 2, "corrupt": 0, "writes": 1}
    again = EmbeddingStore(tmp_path / "c")  # another process, later
    assert np.array_equal(again.get("px|enc"), emb(0))


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    _flip_last_byte,                                         # payload bytes changed: sha256 mismatch
    lambda p: p.write_bytes(p.read_bytes()[:-7]),            # cut short
    lambda p: p.write_bytes(p.read_bytes() + b"extra"),      # overlong
    lambda p: p.write_bytes(b"garbage"),                     # not an entry at all
    lambda p: p.write_bytes(p.read_bytes()[:6] + b"\xff\xff\xff\x7f" + p.read_bytes()[10:]),  # header length
    lambda p: p.write_bytes(p.read_bytes().replace(b'"float32"', b'"float64"')),  # dtype (and so the length)
    lambda p: p.write_bytes(p.read_bytes().replace(b"px|enc", b"px|xyz")),  # another key's entry under this name
    lambda p: p.write_bytes(b""),
], ids=["payload", "short", "long", "garbage", "header-length", "dtype", "key", "empty"])
def test_a_corrupt_entry_is_deleted_and_never_used(tmp_path: Path, damage) -> None:
    store = EmbeddingStore(tmp_path)
    store.put("px|enc", emb(1))
    path = store.path("px|enc")
    damage(path)
    assert store.get("px|enc") is None
    assert store.corrupt == 1 and not path.exists()
    store.put("px|enc", emb(1))  # the recomputed embeddings take its place
    assert np.array_equal(store.get("px|enc"), emb(1))


def test_least_recently_used_entries_go_first_within_the_bound(tmp_path: Path) -> None:
    one = EmbeddingStore(tmp_path).path("k0")
    store = EmbeddingStore(tmp_path)
    store.put("k0", emb(0))
    size = one.stat().st_size
    store = EmbeddingStore(tmp_path, max_bytes=int(size * 3.5))  # room for three entries
    for k in ("k1", "k2"):
        store.put(k, emb(int(k[1])))
    old = time.time() - 100
    for i, k in enumerate(("k0", "k1", "k2")):  # ages: k0 oldest ... k2 youngest
        os.utime(store.path(k), (old + i, old + i))
    assert store.get("k0") is not None  # a hit makes k0 the youngest
    store.put("k3", emb(3))  # over the bound: evict down to 90% of it, the least recently used first
    assert store.nbytes <= store.max_bytes * 0.9 + 1
    assert store.path("k3").exists() and store.path("k0").exists()
    assert not store.path("k1").exists()
    tiny = EmbeddingStore(tmp_path / "t", max_bytes=1)  # the entry just written always stays
    tiny.put("a", emb(0))
    tiny.put("b", emb(1))
    assert tiny.get("b") is not None and tiny.get("a") is None


def test_partial_files_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, max_bytes=1)
    store.put("a", emb(0))
    sub = store.path("a").parent
    dead = sub / f".{store.path('a').name}.partial-999999999-abcd"  # no such pid
    live = sub / f".{store.path('a').name}.partial-{os.getpid()}-abcd"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    store.evict()
    assert not dead.exists() and live.exists()


def test_unusable_folders_are_refused_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder") as err:
        EmbeddingStore(f)
    assert "\n" not in str(err.value)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: nothing to check here
            return
        with pytest.raises(UserError, match="cannot create"):
            EmbeddingStore(ro)
    finally:
        os.chmod(ro, 0o700)


def test_an_unwritable_cache_never_fails_the_caller(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path)
    store.put("a", np.zeros((2, 2, 2), np.float32))  # not a 2-D span: logged, not stored, no exception
    assert len(store) == 0
    sub = store.path("b").parent
    sub.parent.mkdir(parents=True, exist_ok=True)
    sub.write_text("a file where the folder should be")  # mkdir fails: logged, skipped
    store.put("b", emb(0))
    assert store.get("b") is None and store.writes == 0
