"""The persistent embedding cache: image embeddings on disk, the second level behind the pipeline's ImageCache.

Re-running a cohort with another decoder (or asking about the same film tomorrow) then encodes nothing.

- Keyed as the ImageCache is: the sha256 of the pixels the encoder sees and the encoder artifact's sha256. An
  entry's file name is the sha256 of that key; the key itself is in the entry and compared when read.
- Each entry is checked when read (magic, key, dtype, shape, length, sha256 of the payload): a corrupt or foreign
  entry is deleted and recomputed, never used.
- Bounded in bytes: after each write the entries of every process are counted and, above `max_bytes`, the least
  recently used go first (a hit touches the entry's mtime), down to 90% of the bound.
- Safe for several processes on one machine: an entry is written under a private partial name, fsynced, then
  renamed into place (a reader sees a whole entry or none); eviction holds an exclusive lock on `DIR/lock`.
  Keep the folder on a local disk: locks and renames over network filesystems are not to be trusted.

Layout: `DIR/CACHEDIR.TAG` (backup tools skip the folder), `DIR/lock`, `DIR/v1/ab/abcdef....emb`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_STORE_BYTES = 10 << 30  # ~4000 MedGemma 4B images (256 x 2560 float32 = 2.6 MB each)
MAGIC = b"MGEMB\x01"
_HEAD = struct.Struct("<I")  # header length, then the JSON header, then the payload
MAX_HEADER = 1 << 14
MAX_ENTRY_BYTES = 1 << 30  # no image span is this large: a header claiming more is corrupt
DTYPES = ("float32", "float16")
TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# medgemma-edge image-embedding cache (safe to delete)\n"
SUFFIX = ".emb"


class EmbeddingStore:
    """Embeddings [tokens, hidden] by key, on disk under `folder`, at most `max_bytes` of entries."""

    def __init__(self, folder: Path | str, max_bytes: int = DEFAULT_STORE_BYTES) -> None:
        self.dir = Path(folder)
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.corrupt = self.writes = 0
        self._root = self.dir / "v1"
        fix = "pass --cache-dir a folder on a local disk that this user can write"
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"{self.dir}: the embedding cache is not a folder; {fix}")
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "CACHEDIR.TAG").exists():
                (self.dir / "CACHEDIR.TAG").write_text(TAG, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{self.dir}: cannot create the embedding cache ({exc.strerror}); {fix}") from None
        if not os.access(self._root, os.W_OK | os.X_OK):
            raise UserError(f"{self.dir}: the embedding cache is not writable; {fix}")

    def path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self._root / digest[:2] / f"{digest}{SUFFIX}"

    # -- reading ------------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The embeddings stored for `key`, or None (absent, or corrupt: then the entry is deleted)."""
        path = self.path(key)
        try:
            with path.open("rb") as f:
                emb, problem = _read_entry(f, key, os.fstat(f.fileno()).st_size)
        except (FileNotFoundError, NotADirectoryError):
            self.misses += 1
            return None
        except OSError as exc:
            emb, problem = None, f"unreadable ({exc.strerror})"
        if emb is None:
            self.corrupt += 1
            self.misses += 1
            log.warning("embedding cache: %s is %s; it is deleted and the image encoded again", path, problem)
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # least recently used is judged by mtime: a hit makes the entry young again
        except OSError:
            pass
        self.hits += 1
        return emb

    # -- writing ------------------------------------------------------------------------------
    def put(self, key: str, emb: np.ndarray) -> None:
        """Store `emb` under `key`. Never fails the caller: a cache that cannot be written is logged and skipped."""
        arr = np.ascontiguousarray(emb)
        if arr.dtype.name not in DTYPES or arr.ndim != 2:
            log.warning("embedding cache: not caching a %s %s array (entries are 2-D %s)", arr.dtype, arr.shape,
                        "/".join(DTYPES))
            return
        payload = arr.tobytes()
        header = json.dumps({"key": key, "dtype": arr.dtype.name, "shape": list(arr.shape),
                             "sha256": hashlib.sha256(payload).hexdigest()}).encode("utf-8")
        data = MAGIC + _HEAD.pack(len(header)) + header + payload
        path = self.path(key)
        tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)  # a concurrent writer of the same key writes the same bytes: last one wins
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            log.warning("embedding cache: cannot write %s (%s); continuing without caching this image", path,
                        exc.strerror or exc)
            return
        self.writes += 1
        try:
            self.evict(keep=path)  # counts every process's entries (a stat each): milliseconds, against seconds to encode
        except OSError as exc:
            log.warning("embedding cache: cannot evict in %s (%s); the cache may grow past its bound", self.dir,
                        exc.strerror or exc)

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until they fit 90% of the bound; returns how many went.

        Also removes partial files whose writer has died. `keep` (the entry just written) always stays."""
        removed = 0
        with _locked(self.dir / "lock"):
            entries = []
            for sub in self._root.iterdir() if self._root.is_dir() else ():
                for p in sub.iterdir() if sub.is_dir() else ():
                    if p.name.startswith("."):
                        _drop_dead_partial(p)
                        continue
                    try:
                        st = p.stat()
                    except FileNotFoundError:  # another process evicted it meanwhile
                        continue
                    entries.append((st.st_mtime_ns, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            if total > self.max_bytes:
                target = int(self.max_bytes * 0.9)
                for _, size, p in sorted(entries, key=lambda e: e[0]):
                    if total <= target:
                        break
                    if keep is not None and p == keep:
                        continue
                    p.unlink(missing_ok=True)
                    total -= size
                    removed += 1
        if removed:
            log.info("embedding cache: evicted %d least recently used entries (bound %d bytes)", removed,
                     self.max_bytes)
        return removed

    # -- size ---------------------------------------------------------------------------------
    def entries(self) -> list[Path]:
        return sorted(p for p in self._root.glob(f"*/*{SUFFIX}") if not p.name.startswith("."))

    @property
    def nbytes(self) -> int:
        total = 0
        for p in self.entries():
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def __len__(self) -> int:
        return len(self.entries())

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt, "writes": self.writes}


def _read_entry(f, key: str, size: int) -> tuple[np.ndarray | None, str]:  # noqa: ANN001 - a binary file
    """(embeddings, "") for a whole, matching entry; (None, what is wrong) otherwise. Bounded before allocating."""
    start = f.read(len(MAGIC) + _HEAD.size)
    if len(start) < len(MAGIC) + _HEAD.size or not start.startswith(MAGIC):
        return None, "not an entry (no magic)"
    (n_header,) = _HEAD.unpack(start[len(MAGIC):])
    if n_header > MAX_HEADER or len(start) + n_header > size:
        return None, "cut short (header)"
    try:
        header = json.loads(f.read(n_header).decode("utf-8"))
        dtype, shape, digest = header["dtype"], [int(n) for n in header["shape"]], str(header["sha256"])
        stored_key = header["key"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, "damaged (header)"
    if stored_key != key:
        return None, "another image's entry (key mismatch)"
    if dtype not in DTYPES or len(shape) != 2 or min(shape) < 1:
        return None, "damaged (dtype or shape)"
    n_payload = shape[0] * shape[1] * np.dtype(dtype).itemsize
    if n_payload > MAX_ENTRY_BYTES or len(start) + n_header + n_payload != size:
        return None, "cut short or overlong (payload)"
    payload = bytearray(f.read(n_payload))  # writable: backends may hand the array to native code
    if len(payload) != n_payload or hashlib.sha256(payload).hexdigest() != digest:
        return None, "damaged (payload sha256 mismatch)"
    return np.frombuffer(payload, dtype=dtype).reshape(shape), ""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if needed) for the duration of a `with` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _drop_dead_partial(p: Path) -> None:
    """`.NAME.partial-PID-RAND` of a writer that was killed: nobody will rename it into place."""
    pid = p.name.rsplit(".partial-", 1)[-1].split("-")[0]
    if not pid.isdigit():
        return
    try:
        os.kill(int(pid), 0)
        return  # its writer is alive (or another user's process with that pid): leave it
    except ProcessLookupError:
        p.unlink(missing_ok=True)
    except PermissionError:
        return
