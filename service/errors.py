"""API errors: a status code, a message that says what was wrong, a bounded reason label and
the request id (also in the X-Request-ID header), so a client can quote it."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("acs_serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers


def error_body(message: str, reason: str, request_id: str | None) -> dict:
    return {"error": message, "reason": reason, "request_id": request_id}


def error_response(request: Request, status: int, message: str, reason: str,
                   headers=None) -> JSONResponse:
    request.state.reject_reason = reason
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(error_body(message, reason, request_id), status, headers=headers)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request, exc.status, exc.message, exc.reason, exc.headers)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return error_response(request, 422, "; ".join(parts), "bad_parameter")


async def http_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, str(exc.detail), reason,
                          getattr(exc, "headers", None))


CLIENT_CLOSED = 499  # nginx's code for a client that closed the connection before the answer


async def client_disconnect_handler(request: Request, exc: ClientDisconnect) -> JSONResponse:
    """The client went away before its body was read (a client timeout, say): not a server
    error. Nothing can be answered; logs and metrics record 499."""
    log.info("client closed the connection before sending its body: %s %s (request %s)",
             request.method, request.url.path, getattr(request.state, "request_id", None))
    return error_response(request, CLIENT_CLOSED, "client closed the connection", "client_closed")


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered with JSON; the server keeps serving."""
    log.error("internal error on %s %s (request %s)", request.method, request.url.path,
              getattr(request.state, "request_id", None), exc_info=exc)
    return error_response(request, 500, f"internal error: {type(exc).__name__}", "internal")
