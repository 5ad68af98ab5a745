"""ASGI guards in front of the OpenAI app, and the JSON it answers with: a body-size limit
(413 before a byte is parsed) and an API key (401 before the body is read)."""

from __future__ import annotations

import hmac

import orjson
from fastapi.responses import Response

from serving.protocol import error_body


MAX_BODY_BYTES = 4 << 20      # a request body beyond this gets 413 before it is parsed


class JSON(Response):
    """JSON through orjson: fast, and a non-finite float (a NaN logprob from a broken
    adapter) becomes `null` instead of invalid JSON or a 500."""
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def sse(d: dict) -> bytes:
    """One server-sent event carrying `d` as JSON (non-finite floats as null)."""
    return b"data: " + orjson.dumps(d) + b"\n\n"


def error_response(status: int, message: str, type_: str, param=None,
                   code=None) -> JSON:
    return JSON(error_body(message, type_, param, code), status_code=status)


class _BodyTooLarge(BaseException):
    # A BaseException so that the app's catch-all 500 handler lets it through to BodyLimit.
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by Content-Length or as it streams,
    so an oversized prompt never reaches the JSON parser (which holds the event loop)."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def _too_large(self, scope, receive, send) -> None:
        await error_response(413, f"the request body exceeds {self.max_bytes} bytes",
                     "invalid_request_error", code="body_too_large")(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return msg

        async def tracked_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)


class ApiKey:
    """ASGI middleware: the API routes (`/v1/...`, `/tokenize`, `/detokenize`) answer 401
    unless the request carries `Authorization: Bearer <key>`; /health and /metrics stay
    open for probes and scrapers."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize")

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.PROTECTED):
            got = dict(scope.get("headers", ())).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                r = error_response(401, "a valid API key is required: 'Authorization: Bearer "
                                   "<key>'", "invalid_request_error", code="invalid_api_key")
                r.headers["WWW-Authenticate"] = "Bearer"
                return await r(scope, receive, send)
        return await self.app(scope, receive, send)
