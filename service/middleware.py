"""One pure-ASGI middleware: request ids, body limit, API key, HTTP metrics.

A refused body is still read (and dropped, up to DRAIN_BYTES) before the answer goes out:
clients that send the whole body before reading (Python's urllib, requests) would otherwise
get a connection reset instead of the 413.
"""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid

from .errors import ApiError, error_body

_REQUEST_ID = re.compile(r"^[\w\-.:]{1,128}$")
DRAIN_BYTES = 64 * 1024 * 1024  # most of an unread body read before answering; past it: close
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
        body = _Body(receive, settings.max_body_bytes, headers)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                if not await body.drain():
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        metrics.in_flight.inc()
        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                scope["state"]["reject_reason"] = refusal.reason
                await _send_error(send_with_id, refusal, request_id)
            else:
                await self.app(scope, body, send_with_id)
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
        if settings.api_key and scope["path"].startswith(PROTECTED):
            auth = headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(key.encode(), settings.api_key.encode()):
                return ApiError(401, "missing or wrong API key (Authorization: Bearer <key> or "
                                "X-API-Key)", "unauthorized", {"WWW-Authenticate": "Bearer"})
        return None


class _Body:
    """The request's receive: refuses a body over the limit with 413 (by its Content-Length
    before reading, else once the chunks pass it) and can drain what the app left unread."""

    def __init__(self, receive, limit: int, headers: dict[str, str]) -> None:
        self.receive, self.limit = receive, limit
        length = headers.get("content-length", "")
        self.declared = int(length) if length.isdigit() else None
        # a client waiting for "100 Continue" sends nothing unless asked: no need to drain
        self.waits = headers.get("expect", "").lower() == "100-continue"
        self.seen, self.started, self.done = 0, False, False

    async def __call__(self):
        if self.declared is not None and self.declared > self.limit:
            raise ApiError(413, f"request body is {self.declared} bytes; the limit is {self.limit}",
                           "body_too_large")
        message = await self._next()
        if self.seen > self.limit:
            raise ApiError(413, f"request body passes the limit of {self.limit} bytes",
                           "body_too_large")
        return message

    async def _next(self):
        message = await self.receive()
        self.started = True
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message

    async def drain(self) -> bool:
        """Read and drop the unread body; False if it is too large to (the connection closes)."""
        if self.done or (self.waits and not self.started):
            return True
        if self.declared is not None and self.declared - self.seen > DRAIN_BYTES:
            return False
        start = self.seen
        while not self.done and self.seen - start <= DRAIN_BYTES:
            await self._next()
        return self.done


async def _send_error(send, error: ApiError, request_id: str) -> None:
    body = json.dumps(error_body(error.message, error.reason, request_id)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
