"""Errors as OpenAI's clients expect them: a status and `{"error": {"message", "type", "param", "code"}}`,
one line naming the problem and the fix, never a stack trace."""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from medgemma_edge.errors import AuditError, PromptTooLong, UserError

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
         499: "client_disconnected", 500: "server_error", 503: "server_error", 504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        """The label errors are counted by in /metrics."""
        return self.code or TYPES.get(self.status, "error")

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "error"), "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_user_error(exc: UserError) -> ApiError:
    """The library's one-line errors: a prompt that does not fit is OpenAI's context_length_exceeded."""
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), "context_length_exceeded", "messages")
    if isinstance(exc, AuditError):  # the answer is withheld: an unaudited answer is not handed out
        return ApiError(503, str(exc), "audit_log_unwritable")
    return ApiError(400, str(exc), "invalid_request")


def as_api_error(exc: BaseException) -> ApiError:
    """Any exception as the answer a client gets; a bug is one log line (its type), the traceback only with -v."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserError):
        return from_user_error(exc)
    log.error("internal error (%s)", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has details with --verbose",
                    "internal_error")
