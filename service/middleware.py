"""One pure-ASGI middleware: request ids, body limit, API key, HTTP metrics."""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid

from .errors import ApiError

_REQUEST_ID = re.compile(r"^[\w\-.:]{1,128}$")
PROTECTED = ("/v1/", "/v2/models")


class ServingMiddleware:
    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings, metrics = self.state.settings, self.state.metrics
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {}).update(request_id=request_id, start=start)
        status = {"code": 500}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        metrics.in_flight.inc()
        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                scope["state"]["reject_reason"] = refusal.reason
                await _send_error(send_with_id, refusal)
            else:
                await self.app(scope, _limited(receive, settings.max_body_bytes), send_with_id)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            metrics.requests.labels(template, str(status["code"])).inc()
            metrics.request_seconds.labels(template).observe(time.perf_counter() - start)
            reason = scope["state"].get("reject_reason")
            if reason and status["code"] >= 400:
                model = scope["state"].get("model") or scope.get("path_params", {}).get("name", "-")
                metrics.rejections.labels(model if model in self.state.registry.models else "-",
                                          reason).inc()

    def _refusal(self, scope, headers) -> ApiError | None:
        settings = self.state.settings
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return ApiError(413, f"request body is {length} bytes; the limit is "
                            f"{settings.max_body_bytes}", "body_too_large")
        if settings.api_key and scope["path"].startswith(PROTECTED):
            auth = headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(key.encode(), settings.api_key.encode()):
                return ApiError(401, "missing or wrong API key (Authorization: Bearer <key> or "
                                "X-API-Key)", "unauthorized", {"WWW-Authenticate": "Bearer"})
        return None


def _limited(receive, limit: int):
    """A receive that raises 413 once a (chunked) body passes the limit."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, f"request body passes the limit of {limit} bytes",
                               "body_too_large")
        return message
    return wrapped


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps({"error": error.message, "reason": error.reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
