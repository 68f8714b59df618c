"""ASGI guards in front of the marketplace app: request-body limits and security headers.

:class:`BodyLimit` answers 413 before the app parses anything: at once when ``Content-Length``
says the body is too big, and as soon as a streamed (chunked) body passes the limit. Forms
(sign-up, sign-in, licence, keys) get a smaller limit than the JSON API, which bounds both the
number and the size of form fields. :class:`SecurityHeaders` adds the headers every response
carries (no sniffing, no framing, no referrer, so a signed link never leaks to another site
through ``Referer``; a content security policy; ``no-store`` so account pages are not cached;
HSTS when cookies are Secure, i.e. behind HTTPS). Both are plain ASGI middleware: Starlette has
no body limit of its own, and these are the few lines it takes.
"""

from __future__ import annotations

import json

FORM_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data")
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(
        self,
        app,
        max_body_bytes: int,
        max_form_bytes: int,
        max_upload_bytes: int | None = None,
        upload_paths: tuple[str, ...] = (),
    ):
        self.app, self.max_body, self.max_form = app, max_body_bytes, max_form_bytes
        # Forms posted to ``upload_paths`` (files, pasted samples) get their own, larger limit.
        self.max_upload, self.upload_paths = max_upload_bytes or max_form_bytes, upload_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        is_form = headers.get(b"content-type", b"").lower().startswith(FORM_TYPES)
        limit = self.max_form if is_form else self.max_body
        if is_form and scope.get("path") in self.upload_paths:  # an upload or a pasted sample
            limit = self.max_upload
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _refuse(send, limit)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if started:  # the app answered before reading it all: nothing more to say
                return
            await _refuse(send, limit)


async def _refuse(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body: at most {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    def __init__(self, app, hsts: bool):
        self.app = app
        self.headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"content-security-policy", CSP.encode()),
        ]
        if hsts:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = list(self.headers)
                if b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
