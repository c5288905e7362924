"""The audit log: one JSON line per answer, enough to prove what ran on what, and nothing that
identifies a patient (no pixels, no prompt or answer text, no DICOM tags) unless asked for."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import ImageInput
from medgemma_edge.runtime.generate import NOTICE, GenerationResult


def input_sha256(image: ImageInput) -> str:
    """sha256 of the file as stored (or of a PIL image's pixels): identifies the input, reveals nothing."""
    if isinstance(image, Image.Image):
        return hashlib.sha256(image.tobytes()).hexdigest()
    h = hashlib.sha256()
    with Path(image).open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class AuditLog:
    def __init__(self, path: Path, include_text: bool = False) -> None:
        self.path, self.include_text = path, include_text
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))  # private: it may hold text
        except OSError as exc:
            raise UserError(f"{path}: cannot write the audit log ({exc.strerror}); choose a writable --audit-log") from exc

    def record(self, command: str, info: dict[str, Any], prompt: str, system: str | None,
               images: Sequence[ImageInput], result: GenerationResult) -> None:
        entry: dict[str, Any] = {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "command": command,
            "bundle_id": info.get("bundle_id"),
            "artifacts": {k: info.get(k) for k in ("decoder", "encoder", "decoder_sha256", "encoder_sha256")},
            "inputs_sha256": [input_sha256(i) for i in images],
            "prompt_sha256": hashlib.sha256(f"{system or ''}\x00{prompt}".encode()).hexdigest(),
            "tokens": {"prompt": result.prompt_tokens, "image": result.image_tokens,
                       "generated": len(result.token_ids), "reused": result.reused_tokens},
            "timings": result.timings,
            "stop_reason": result.stop_reason,
            "notice": NOTICE,
        }
        if self.include_text:
            entry.update({"system": system, "prompt": prompt, "answer": result.text})
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        # one write on an O_APPEND descriptor: concurrent runs never interleave inside a line
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
