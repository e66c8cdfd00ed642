"""Who may use the console: loopback by default, an access token otherwise, and guards on every request.

Rules (an ASGI middleware in front of every HTTP request and WebSocket):

- Listening on loopback needs no access token (the machine's users are trusted; reach it from elsewhere
  through an SSH tunnel). The `Host` header must then name a loopback host (`127.0.0.1`, `localhost`,
  `[::1]`, any port), which defeats DNS-rebinding pages.
- Listening on any other interface requires an access token (generated and printed at start, or read
  from a file). Every request and WebSocket without it gets 401. The token may come as
  `Authorization: Bearer T`, an `X-Console-Token: T` header, the `console_token` cookie (HttpOnly,
  SameSite=Lax; set when the page is opened with `?token=T`, which then redirects to `/` so the token
  leaves the address bar) or the `token` query parameter.
- State-changing requests (every POST: answers, pause / resume / abort, explore actions) need the token
  in the `X-Console-Token` header, never just a cookie (a cross-site form cannot set headers). On loopback
  without an access token a per-process token is used for this; the page receives it embedded in its
  HTML. POSTs and WebSockets whose `Origin` is not the page's own origin are refused (403).
- Request bodies are limited (`max_body_bytes`; explore uploads `max_upload_bytes`): 413 beyond.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

TOKEN_HEADER = "x-console-token"
TOKEN_COOKIE = "console_token"
#: Default limit of a request body (answers and settings are small).
MAX_BODY_BYTES = 64 * 1024
#: Limit of an image uploaded to the explore view.
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
UPLOAD_PATH = "/api/explore/upload"
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class SecurityError(ValueError):
    """The console would listen somewhere it may not (e.g. off loopback without a token)."""


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1."""
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def read_token_file(path: str | Path) -> str:
    """The token in a file (first line, stripped); SecurityError if missing or shorter than 16 characters."""
    try:
        lines = Path(path).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityError(f"cannot read the token file {path}: {exc}") from exc
    token = lines[0].strip() if lines else ""
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise SecurityError(f"the token in {path} must be one line of at least 16 printable characters, no spaces")
    return token


class AccessPolicy:
    """The console's access rules for one listening address (see the module docstring)."""

    def __init__(
        self,
        host: str,
        token: str | None = None,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ) -> None:
        self.loopback = is_loopback_host(host)
        if token is not None and len(token) < 16:
            raise SecurityError("an access token must be at least 16 characters")
        self.token_generated = token is None and not self.loopback
        if self.token_generated:
            token = secrets.token_urlsafe(24)
        #: Required on every request when set (non-loopback, or a token was given).
        self.access_token: str | None = token
        #: Required in the X-Console-Token header of state-changing requests.
        self.api_token: str = token or secrets.token_urlsafe(24)
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    def check_token(self, candidate: str | None, token: str | None = None) -> bool:
        """Constant-time comparison with the access token (or `token`)."""
        expected = token if token is not None else self.access_token
        if expected is None:
            return True
        return candidate is not None and hmac.compare_digest(candidate.encode(), expected.encode())

    def presented_token(self, headers: Headers, query_string: bytes) -> str | None:
        """The token a request carries (header, bearer, cookie or query), or None."""
        if headers.get(TOKEN_HEADER):
            return headers[TOKEN_HEADER]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        cookie_header = headers.get("cookie")
        if cookie_header:
            cookies: SimpleCookie = SimpleCookie()
            try:
                cookies.load(cookie_header)
            except Exception:  # malformed cookies are simply not a token
                cookies = SimpleCookie()
            if TOKEN_COOKIE in cookies:
                return cookies[TOKEN_COOKIE].value
        query = parse_qs(query_string.decode("latin-1"))
        values = query.get("token")
        return values[0] if values else None


class AccessMiddleware:
    """ASGI middleware enforcing an `AccessPolicy` on HTTP requests and WebSockets."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        policy = self.policy
        host = headers.get("host", "")
        if policy.loopback and not is_loopback_host(urlsplit(f"//{host}").hostname or ""):
            await _deny(scope, receive, send, 403, "this console only answers requests addressed to localhost")
            return
        if policy.access_token is not None:
            token = policy.presented_token(headers, scope.get("query_string", b""))
            if not policy.check_token(token):
                await _deny(scope, receive, send, 401, "access token required: open the URL printed at start")
                return
        method = scope.get("method", "GET")
        state_changing = scope["type"] == "http" and method not in ("GET", "HEAD", "OPTIONS")
        if state_changing or scope["type"] == "websocket":
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
                await _deny(scope, receive, send, 403, "cross-origin request refused")
                return
        if state_changing and not policy.check_token(headers.get(TOKEN_HEADER), policy.api_token):
            await _deny(scope, receive, send, 401, f"state-changing requests need the {TOKEN_HEADER} header")
            return
        if scope["type"] == "http":
            limit = policy.max_upload_bytes if scope.get("path") == UPLOAD_PATH else policy.max_body_bytes
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                await _deny(scope, receive, send, 413, f"request body larger than {limit} bytes")
                return
            receive = _limited_receive(receive, limit)
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """A request body grew past its limit while being read (chunked upload)."""


def _limited_receive(receive: Receive, limit: int) -> Receive:
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(f"request body larger than {limit} bytes")
        return message

    return wrapped


async def _deny(scope: Scope, receive: Receive, send: Send, status: int, reason: str) -> None:
    body = (f'{{"error": "{reason}"}}').encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # the websocket.connect message
    extensions: dict[str, Any] = scope.get("extensions") or {}
    if "websocket.http.response" in extensions:
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": reason})
