"""The audit log: one JSON line per answer, enough to prove what ran on what, and nothing that
identifies a patient (no pixels, no prompt or answer text, no DICOM tags) unless asked for."""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from medgemma_edge.errors import AuditError, UserError
from medgemma_edge.fsutil import drop_torn_tail, sha256_file
from medgemma_edge.inputs.images import ImageInput
from medgemma_edge.runtime.generate import NOTICE, GenerationResult

log = logging.getLogger(__name__)


def input_sha256(image: ImageInput) -> str:
    """sha256 of the file as stored (or of a PIL image's pixels): identifies the input, reveals nothing."""
    if isinstance(image, Image.Image):
        return hashlib.sha256(image.tobytes()).hexdigest()
    return sha256_file(Path(image))


class AuditLog:
    """Checked when opened, before any answer is generated; each record is one whole line or nothing.

    The file is created on the first record, never empty: a run that fails before answering leaves no file.
    """

    def __init__(self, path: Path, include_text: bool = False) -> None:
        self.path, self.include_text = Path(path), include_text
        fix = "choose a regular, writable file for --audit-log"
        try:
            st = self.path.stat()
        except FileNotFoundError:
            parent = self.path.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"{self.path}: cannot create the audit log's folder ({exc.strerror}); {fix}") from exc
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{self.path}: cannot create the audit log (folder {parent} is not writable); {fix}")
            return
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the audit log's status ({exc.strerror}); {fix}") from exc
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/full would swallow every line
            raise UserError(f"{self.path}: is not a regular file; {fix}")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                pseudo = st.st_size == 0 and os.read(fd, 1) != b""  # /proc and /sys files: size 0, yet content
            finally:
                os.close(fd)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot write the audit log ({exc.strerror}); {fix}") from exc
        if pseudo:
            raise UserError(f"{self.path}: is a kernel pseudo-file, not a log file; {fix}")
        try:
            self._drop_torn_tail()
        except OSError as exc:
            raise UserError(f"{self.path}: cannot repair the audit log ({exc.strerror}); {fix}") from exc

    def _drop_torn_tail(self) -> None:
        """Keep only whole lines: a writer killed inside its one write may have left part of one at the end."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            dropped = drop_torn_tail(fd)
        finally:
            os.close(fd)
        if dropped:
            log.warning("%s: dropped the last %d bytes, a line cut short when its writer was killed", self.path,
                        dropped)

    def record(self, command: str, info: dict[str, Any], prompt: str, system: str | None,
               images: Sequence[ImageInput], result: GenerationResult) -> None:
        """Append one line; on any failure the file is left as it was and AuditError says the run is unaudited."""
        entry: dict[str, Any] = {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "command": command,
            "bundle_id": info.get("bundle_id"),
            "artifacts": {k: info.get(k) for k in ("decoder", "encoder", "decoder_sha256", "encoder_sha256")},
            "inputs_sha256": [input_sha256(i) for i in images],
            "prompt_sha256": hashlib.sha256(f"{system or ''}\x00{prompt}".encode("utf-8", "surrogatepass")).hexdigest(),
            "tokens": {"prompt": result.prompt_tokens, "image": result.image_tokens,
                       "generated": len(result.token_ids), "reused": result.reused_tokens},
            "timings": result.timings,
            "stop_reason": result.stop_reason,
            "notice": NOTICE,
        }
        if self.include_text:
            entry.update({"system": system, "prompt": prompt, "answer": result.text})
        self.append(json.dumps(entry, ensure_ascii=False) + "\n")

    def append(self, line: str) -> None:
        data = line.encode("utf-8", "surrogatepass")
        existed = self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # private: it may hold text
        except OSError as exc:
            raise self._unaudited(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # writers on this machine take turns: no line is interleaved
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            except OSError as exc:
                try:  # never leave half a line (or an empty file we created) behind; `size` is read under the
                    os.ftruncate(fd, size)  # lock, so a file another writer has written to is never removed
                    if size == 0 and not existed:
                        os.unlink(self.path)
                except OSError:
                    log.warning("%s: could not remove a partly written audit line", self.path)
                raise self._unaudited(exc) from exc
        finally:
            os.close(fd)

    def _unaudited(self, exc: OSError) -> AuditError:
        return AuditError(f"{self.path}: the answer was produced but is NOT audited: the audit line could not be "
                          f"written ({exc.strerror or exc}); free space or choose another --audit-log, then run again")
