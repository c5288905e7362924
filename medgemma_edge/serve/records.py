"""One audit line per request, in `run`'s shape (hashes, artifact ids, token counts, timings, stop reason,
the notice) plus the request id the client got in `X-Request-Id`, the endpoint, the status and, for a
refusal, the error code. No prompt, answer or pixels unless --audit-include-text.

Each line goes through `AuditLog.append`: one write of a whole line, or nothing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from typing import Any

from medgemma_edge.runtime.audit import AuditLog
from medgemma_edge.runtime.generate import NOTICE, GenerationResult


def prompt_sha256(system: str | None, prompt: str) -> str:
    """As `run` hashes its prompt: a one-question request hashes equal to `run` with that question."""
    return hashlib.sha256(f"{system or ''}\x00{prompt}".encode("utf-8", "surrogatepass")).hexdigest()


class AuditTrail:
    def __init__(self, log: AuditLog | None) -> None:
        self.log = log

    @property
    def include_text(self) -> bool:
        return bool(self.log and self.log.include_text)

    def line(self, request_id: str, endpoint: str, status: int, fields: dict[str, Any]) -> str:
        entry: dict[str, Any] = {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "command": "serve", "request_id": request_id, "endpoint": endpoint, "status": status,
            **fields, "notice": NOTICE,
        }
        return json.dumps(entry, ensure_ascii=False) + "\n"

    def write(self, request_id: str, endpoint: str, status: int, fields: dict[str, Any]) -> None:
        """Raises AuditError (the file as it was) when the line cannot be written."""
        if self.log is not None:
            self.log.append(self.line(request_id, endpoint, status, fields))


def answer_fields(info: dict[str, Any], inputs_sha256: list[str], system: str | None, prompt: str,
                  result: GenerationResult, answer: str, stop_reason: str, include_text: bool) -> dict[str, Any]:
    """What `run` records about an answer (AuditLog.record's fields), from a server request."""
    fields: dict[str, Any] = {
        "bundle_id": info.get("bundle_id"),
        "artifacts": {k: info.get(k) for k in ("decoder", "encoder", "decoder_sha256", "encoder_sha256")},
        "inputs_sha256": inputs_sha256,
        "prompt_sha256": prompt_sha256(system, prompt),
        "tokens": {"prompt": result.prompt_tokens, "image": result.image_tokens,
                   "generated": len(result.token_ids), "reused": result.reused_tokens},
        "timings": result.timings,
        "stop_reason": stop_reason,  # the library's (eos, length, context), or "stop" for a stop string
    }
    if include_text:
        fields.update({"system": system, "prompt": prompt, "answer": answer})
    return fields
