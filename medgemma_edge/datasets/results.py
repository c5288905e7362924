"""The results file: JSONL, one whole line per item, appended and fsynced, and what a resumed run skips.

Durability: each record is one `write` of a whole line on an O_APPEND descriptor, then fsync. SIGKILL can strike
only before the write (the item has no line: it runs again), inside it (a torn last line: detected and cut off
when the file is next opened, so that item runs again) or after it (the line is whole: the item is skipped). A
line is never rewritten in place, so no item is duplicated or lost. One run writes a file at a time: the file
is flock'ed while open and a second writer is refused.

Each line carries its `key` (datasets/jobs.py: item, inputs, bundle, artifacts, parameters); an item whose key
has a line, "ok" or "error", is done. `drop_errors` removes the error lines of chosen keys (one atomic rewrite)
so that a run can retry them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import atomic_write, drop_torn_tail

log = logging.getLogger(__name__)

MAX_RESULT_LINE = 16 << 20  # a line is an answer with its numbers: more is not a line this writer wrote


class ResultLog:
    """An open results file: `done` maps each key with a line to its status ("ok" or "error")."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.done: dict[str, str] = {}
        self.repaired = 0  # bytes of a torn last line cut off when opened
        self.other = 0  # lines of other keys (another bundle, other parameters): kept, never touched
        self.fd = -1
        fix = "choose a regular, writable file for --output"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            st = self.path.stat() if self.path.exists() else None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise UserError(f"{self.path}: is not a regular file; {fix}")
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot open the results file ({exc.strerror}); {fix}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise UserError(f"{self.path}: another run is writing this results file; wait for it to finish or "
                            f"choose another --output") from None
        try:
            self._repair()
            for number, record in self.records():
                key = record.get("key")
                if not isinstance(key, str):
                    raise UserError(f"{self.path}: line {number} has no `key`: not a line medgemma-edge wrote; "
                                    f"remove it or choose another --output")
                self.done[key] = str(record.get("status"))
        except BaseException:
            self.close()
            raise

    def _repair(self) -> None:
        """Cut off a torn last line (a writer killed inside its one write)."""
        self.repaired = drop_torn_tail(self.fd)
        if self.repaired:
            log.warning("%s: dropped a torn last line (%d bytes, its writer was killed); that item runs again",
                        self.path, self.repaired)

    def records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, record) of every line, each checked to be a JSON object."""
        for number, _, record in self._lines():
            yield number, record

    def _lines(self) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        with open(self.path, "rb") as f:
            for number, raw in enumerate(iter(lambda: f.readline(MAX_RESULT_LINE + 1), b""), start=1):
                try:
                    if len(raw) > MAX_RESULT_LINE:
                        raise ValueError("too long")
                    record = json.loads(raw.decode("utf-8"))
                    if not isinstance(record, dict):
                        raise ValueError("not an object")
                except (ValueError, UnicodeDecodeError):
                    raise UserError(f"{self.path}: line {number} is not a JSON object (the file was edited or "
                                    f"damaged); remove that line or choose another --output") from None
                yield number, raw, record

    def count_other(self, keys: Iterable[str]) -> int:
        """Lines whose key is not among `keys` (results of other items, bundles or parameters)."""
        wanted = set(keys)
        self.other = sum(1 for k in self.done if k not in wanted)
        return self.other

    def append(self, record: dict[str, Any]) -> None:
        """One whole line, written in one call and fsynced; on a failed write the file is cut back."""
        try:
            text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        except ValueError:  # a nan or inf (a timing divided by ~0): JSON has no such number, so it becomes null
            text = json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)
        data = (text + "\n").encode("utf-8", "surrogatepass")
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(self.fd)
        except OSError as exc:
            os.ftruncate(self.fd, size)
            raise UserError(f"{self.path}: cannot append a result ({exc.strerror or exc}); free space or choose "
                            f"another --output, then run again (it resumes)") from None
        self.done[record["key"]] = str(record.get("status"))

    def drop_errors(self, keys: Iterable[str]) -> int:
        """Remove the error lines of `keys` (one atomic rewrite of the file), so those items run again."""
        retry = {k for k in keys if self.done.get(k) == "error"}
        if not retry:
            return 0
        kept = [raw for _, raw, r in self._lines() if not (r.get("key") in retry and r.get("status") == "error")]
        atomic_write(self.path, b"".join(kept))
        os.close(self.fd)  # the lock belonged to the old file: take it on the new one
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{self.path}: another run opened this results file meanwhile; run again") from None
        for k in retry:
            del self.done[k]
        return len(retry)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ResultLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
