"""Every size a client can send, bounded before work starts: the body (413, counted as it streams in, so a
lying or missing Content-Length changes nothing), images per request, waiting requests (429), time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medgemma_edge.errors import UserError
from medgemma_edge.serve.apierrors import ApiError

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    parallel: int = 1  # slots: requests generating at once, each with its own KV cache
    max_queue: int = 8  # requests waiting for a slot; past it, 429 with Retry-After
    max_body_bytes: int = 64 * MiB  # base64 makes images 4/3 larger: a 46 MB 16-bit mammogram fits
    max_images: int = 16  # per request (each also costs its tokens in the context)
    request_timeout_s: float = 600.0  # from arrival to the last token

    def __post_init__(self) -> None:
        for name, lo, hi in (("parallel", 1, 64), ("max_queue", 0, 4096), ("max_images", 1, 1024)):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise UserError(f"--{name.replace('_', '-')} {value} is out of range: give {lo}..{hi}")
        if self.max_body_bytes < 1024:
            raise UserError("--max-body-mb is too small to hold a request; give at least 0.001")
        if not 0 < self.request_timeout_s <= 86400:
            raise UserError(f"--request-timeout {self.request_timeout_s} is out of range: give 1..86400 seconds")


class TooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so that the framework's body parser passes it on."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    """413 for a body over `max_bytes`: from Content-Length at once, else while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, send)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise TooLarge()
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except TooLarge:
            if not started:
                await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        err = ApiError(413, f"the request body is larger than this server's limit of {self.max_bytes:,} bytes "
                            f"(--max-body-mb); send smaller or fewer images", "request_too_large")
        scope.setdefault("state", {})["error_kind"] = err.kind
        await send_json(send, err.status, err.body(), {"connection": "close"})


async def send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
