"""Atomic publishing of files and folders, content hashes, and the repair of a line-per-record file.

Everything medgemma-edge writes that another process may read (bundles, manifests, synthetic
checkpoints, the tokenizer cache, validation reports) is written under a hidden partial name that
carries the writer's PID, fsynced, then renamed into place: a reader sees the old version or the new
one, never half of one, and two writers never delete each other's work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def drop_torn_tail(fd: int) -> int:
    """Cut a file of whole lines back to its last newline; returns the bytes dropped (0: it already ends whole).

    A writer killed inside its one write (SIGKILL, power loss) can leave part of a line at the end, and only there.
    """
    size = pos = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    keep = 0
    while pos > 0:  # the last newline, read backwards a block at a time
        start = max(0, pos - (1 << 16))
        cut = os.pread(fd, pos - start, start).rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        pos = start
    os.ftruncate(fd, keep)
    os.fsync(fd)
    return size - keep


def regular_file_size(path: Path) -> int | None:
    """The size of a regular file (following links), or None for anything else: missing, a folder, a pipe,
    a device. Callers refuse None before they open the path, so nothing ever blocks on a FIFO."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def partial_path(target: Path, kind: str = "partial") -> Path:
    """`.NAME.partial-PID` beside `target`: hidden, and owned by this process alone."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a partial file: fsync, then os.replace."""
    path = Path(path)
    tmp = partial_path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(target: Path) -> None:
    """Tidy up after writers of `target` that were killed: drop their partial folders or files, and put
    back a `target` that was being replaced (`.NAME.old-PID`) if the new one never made it into place."""
    for stale in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = stale.name[len(target.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            log.warning("restoring %s, which an interrupted replacement had moved aside", target)
            stale.rename(target)
        elif stale.is_dir():
            log.info("removing leftovers of an interrupted write: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def publishing_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty partial folder; when the block ends without error, publish it as `target`.

    `target` may be missing or an empty folder; with `replace`, an existing `target` is swapped out by
    two renames (a kill in between leaves `.old-PID`, which `clean_leftovers` restores). On error the
    partial folder is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = partial_path(target)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync(p)
        _fsync(tmp)
        if replace and target.exists() and any(target.iterdir()):
            old = partial_path(target, "old")
            target.rename(old)
            try:
                tmp.rename(target)
            except OSError:
                old.rename(target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(target)
            except OSError as exc:  # someone filled `target` meanwhile: never replace what was not checked
                raise FileExistsError(errno.EEXIST, "appeared while it was being written", str(target)) from exc
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
