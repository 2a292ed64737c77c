"""API errors: a status code, a message that says what was wrong, and a bounded reason label."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers


def error_response(status: int, message: str, reason: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status, headers=headers)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    request.state.reject_reason = exc.reason
    return error_response(exc.status, exc.message, exc.reason, exc.headers)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    request.state.reject_reason = "bad_parameter"
    return error_response(422, "; ".join(parts), "bad_parameter")


async def http_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), reason, getattr(exc, "headers", None))


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug: answer with JSON rather than a bare 500 page; the server keeps serving."""
    return error_response(500, f"internal error: {type(exc).__name__}", "internal")
