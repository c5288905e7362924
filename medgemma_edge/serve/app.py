"""The routes: an OpenAI-compatible API over the library, the browser page, health and metrics.

Each route parses its input and calls the library (through `ServerState`); errors are OpenAI's JSON error
bodies, never a stack trace. No prompt, answer or pixel is logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from medgemma_edge.errors import UserError
from medgemma_edge.runtime.generate import NOTICE
from medgemma_edge.serve.apierrors import ApiError, as_api_error
from medgemma_edge.serve.completions import chat_completion, ready_pool
from medgemma_edge.serve.gate import Gate
from medgemma_edge.serve.limits import BodyLimit
from medgemma_edge.serve.metrics import CONTENT_TYPE
from medgemma_edge.serve.schemas import (ChatCompletion, ChatRequest, ErrorResponse, Health, ModelList,
                                         RenderRequest)
from medgemma_edge.serve.state import ServerState

log = logging.getLogger(__name__)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": ApiErrorDescriptions.get(code, "error")} for code in codes}


ApiErrorDescriptions = {400: "invalid request (OpenAI error format); context_length_exceeded when it does not fit",
                        401: "no API key sent", 403: "wrong API key", 404: "no such route", 413: "body too large",
                        429: "queue full (Retry-After)", 499: "client went away", 500: "internal error",
                        503: "loading, or the audit log cannot be written", 504: "past --request-timeout"}
COMMON = (400, 401, 403, 413, 500)


def page_html() -> tuple[str, str]:
    """The page, and its Content-Security-Policy: only its own inline script and style, by hash."""
    html = resources.files("medgemma_edge.serve").joinpath("page.html").read_text(encoding="utf-8")
    html = html.replace("{{NOTICE}}", NOTICE)

    def digests(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {digests('script')}; style-src {digests('style')}; "
           f"img-src blob: data:; connect-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="medgemma-edge", version="1", summary=f"OpenAI-compatible MedGemma server. {NOTICE}",
                  docs_url=None, redoc_url=None)  # the interactive docs load assets from a CDN: not offline
    html, csp = page_html()

    def error_response(request: Request, err: ApiError) -> JSONResponse:
        request.scope.setdefault("state", {})["error_kind"] = err.kind
        return err.response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return error_response(request, as_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        # the message names the field and the rule, never the value sent (it may be patient text)
        msg = str(first.get("msg", "invalid value")).rstrip(".")
        return error_response(request, ApiError(400, f"{where}: {msg}; see /openapi.json for the request format",
                                                "invalid_request", where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            limit = state.config.limits.max_body_bytes
            err = ApiError(413, f"the request body is larger than this server's limit of {limit:,} bytes "
                                f"(--max-body-mb); send smaller or fewer images", "request_too_large")
        elif exc.status_code == 404:
            err = ApiError(404, f"no route {request.url.path}; see /openapi.json", "not_found")
        elif exc.status_code == 405:
            err = ApiError(405, f"{request.method} is not allowed on {request.url.path}; see /openapi.json",
                           "method_not_allowed")
        else:
            err = ApiError(exc.status_code, str(exc.detail), f"http_{exc.status_code}")
        err.headers.update(exc.headers or {})  # 405's Allow
        return error_response(request, err)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers={"content-security-policy": csp})

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "loading"}})
    async def health() -> JSONResponse:
        """200 when ready, 503 while loading. Needs no key; says nothing else."""
        return JSONResponse({"status": "ok"} if state.ready else {"status": "loading"},
                            status_code=200 if state.ready else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}},
                                                             **_errors(401, 403)})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401, 403, 503))
    async def models() -> dict[str, Any]:
        ready_pool(state)
        return {"object": "list", "data": [await asyncio.to_thread(state.model_card)]}

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "JSON, or server-sent events with stream: true"},
                         **_errors(*COMMON, 429, 499, 503, 504)})
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await chat_completion(state, request, body)

    @app.post("/v1/render", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "what the model sees, as PNG"},
                         **_errors(*COMMON, 503)})
    async def render(body: RenderRequest, request: Request) -> Response:
        """The image exactly as the model will see it (DICOM windowing, RGB, stretched to the encoder's square)."""
        ready_pool(state)
        png = await asyncio.to_thread(state.preview_png, body.image_url.url)
        return Response(png, media_type="image/png")

    original = app.openapi

    def openapi() -> dict[str, Any]:  # validation errors are answered 400 in OpenAI's format, never 422
        if app.openapi_schema is None:
            schema = original()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=state.config.limits.max_body_bytes)
    app.add_middleware(Gate, state=state)
    if state.config.cors_origins:  # off unless asked for: a browser on another origin gets no answer it can read
        app.add_middleware(CORSMiddleware, allow_origins=list(state.config.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"],
                           expose_headers=["x-request-id"])
    return app
