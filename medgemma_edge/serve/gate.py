"""The gate every HTTP request passes first: a request id (returned in `X-Request-Id`), the Host check that
keeps a loopback server out of reach of DNS-rebinding web pages, the API key, security headers, request
metrics, and the audit line of a request the handler did not record itself (refusals, failures)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medgemma_edge.errors import AuditError
from medgemma_edge.serve.apierrors import ApiError, as_api_error
from medgemma_edge.serve.auth import is_loopback
from medgemma_edge.serve.limits import send_json
from medgemma_edge.serve.state import ServerState

log = logging.getLogger(__name__)

OPEN = frozenset({"/health"})  # needs no key, reveals nothing
AUDITED = frozenset({"/v1/chat/completions", "/v1/render"})  # the endpoints that see patient data
KNOWN = frozenset({"/", "/health", "/metrics", "/openapi.json", "/v1/models", *AUDITED})
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
CHALLENGE = 'Basic realm="medgemma-edge", charset="UTF-8"'  # lets a browser ask for the key (as password)


def host_name(scope: Scope) -> str:
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Gate:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state
        self.loopback_only = is_loopback(state.config.host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        st: dict[str, Any] = scope.setdefault("state", {})
        client = scope.get("client")
        st.update(request_id=request_id, audit={}, key_id=None, client=client[0] if client else None)
        path = scope["path"]
        endpoint = path if path in KNOWN else "other"
        status = [500]

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                st["started"] = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      *SECURITY_HEADERS]
                if status[0] >= 400 and path in AUDITED and not st["audit"].get("written"):
                    await self._audit(request_id, path, status[0], st)  # a refusal is on record before it is sent
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                st["error_kind"] = refusal.kind
                await send_json(stamped, refusal.status, refusal.body(), refusal.headers)
            else:
                try:
                    await self.app(scope, receive, stamped)
                except Exception as exc:  # noqa: BLE001 - a bug answers 500 in one line, never a traceback
                    err = as_api_error(exc)
                    st["error_kind"] = err.kind
                    if status[0] == 500 and not st.get("started"):
                        await send_json(stamped, err.status, err.body())
        finally:
            m = self.state.metrics
            m.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            if status[0] >= 400 or st.get("error_kind"):
                m.error(st.get("error_kind") or f"http_{status[0]}")
            if path in AUDITED and not st["audit"].get("written"):
                await self._audit(request_id, path, status[0], st)

    def _refusal(self, scope: Scope, path: str) -> ApiError | None:
        if self.loopback_only and not is_loopback(host_name(scope)):
            # a page on another site that resolved its own name to 127.0.0.1 must not reach the API
            return ApiError(400, "the Host header names another machine, and this server listens on loopback only; "
                                 "connect to 127.0.0.1 or localhost", "host_not_allowed")
        if not self.state.keys or path in OPEN:
            return None
        auth = dict(scope["headers"]).get(b"authorization")
        code, key_id = self.state.keys.check(auth.decode("latin-1") if auth is not None else None)
        if code == 401:
            return ApiError(401, "this server needs an API key: send `Authorization: Bearer KEY`",
                            "missing_api_key", headers={"www-authenticate": CHALLENGE})
        if code == 403:
            return ApiError(403, "the API key is not accepted by this server; check the key", "invalid_api_key")
        scope["state"]["key_id"] = key_id
        return None

    async def _audit(self, request_id: str, path: str, status: int, st: dict[str, Any]) -> None:
        fields = {"client": _client(st), "key_id": st.get("key_id"), **st["audit"].get("fields", {})}
        if st.get("error_kind"):
            fields["error"] = st["error_kind"]
        st["audit"]["written"] = True
        try:
            await asyncio.to_thread(self.state.audit.write, request_id, path, status, fields)
        except AuditError as exc:
            log.error("%s", exc)


def _client(st: dict[str, Any]) -> str | None:
    return st.get("client")
