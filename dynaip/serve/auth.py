"""Authentication for `dynaip serve`: a token or a user:password, checked on every request.

Off loopback the app refuses to start without credentials (``require_for_host``): anyone who can reach
the port could otherwise browse every dataset path the process can read and run generations. On loopback
credentials are optional (as easy as before) but, when given, enforced too — other users of a shared
machine reach 127.0.0.1 as well (README.md, "On a shared machine").

Where credentials come from: ``--token`` / ``--auth user:password``, else the environment variables
``DYNAIP_SERVE_TOKEN`` / ``DYNAIP_SERVE_AUTH`` (preferred: a command line is visible to every user in
``ps``). A request is let through when it carries any of

- ``Authorization: Bearer <token>`` (API clients, ``gradio_client.Client(url, headers=...)``);
- ``Authorization: Basic`` with the user and password (a token: any user name, the token as password) —
  what a browser sends after its own login prompt;
- the session cookie set after a browser opened ``/?token=<token>`` once (the app then redirects to the
  same address without the token, so it does not stay in the address bar or history).

Everything else, on every route (the pages, the Gradio API and its file and queue routes, the shard and
sample links), is ``401`` with a one-line body. Secrets are compared in constant time and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

TOKEN_ENV = "DYNAIP_SERVE_TOKEN"
AUTH_ENV = "DYNAIP_SERVE_AUTH"
COOKIE = "dynaip_session"
MIN_TOKEN = 16  # a shorter secret is guessable over the network


class AuthError(ValueError):
    """Bad or missing credentials at start: one line, exit 2."""


@dataclass(frozen=True)
class Credentials:
    """A token, or a user name and password (not both)."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @property
    def secret(self) -> str:
        return self.token if self.token is not None else f"{self.user}:{self.password}"

    def session(self) -> str:
        """The session cookie's value: a keyed hash of the secret, so the cookie is not the secret itself."""
        return hmac.new(self.secret.encode(), b"dynaip-serve-session", hashlib.sha256).hexdigest()

    def accepts(self, user: str | None, password: str) -> bool:
        if self.token is not None:
            return hmac.compare_digest(password.encode(), self.token.encode())
        return (
            user is not None
            and hmac.compare_digest(user.encode(), (self.user or "").encode())
            and hmac.compare_digest(password.encode(), (self.password or "").encode())
        )


def credentials(
    token: str | None = None, auth: str | None = None, env: dict[str, str] | None = None
) -> Credentials | None:
    """Credentials from the flags, else from the environment; None when none is given. A malformed value
    is an ``AuthError`` naming the flag or variable (never the secret)."""
    env = os.environ if env is None else env
    token_from, auth_from = "--token", "--auth"
    if token is None and auth is None:
        token, auth = env.get(TOKEN_ENV) or None, env.get(AUTH_ENV) or None
        token_from, auth_from = TOKEN_ENV, AUTH_ENV
    if token is not None and auth is not None:
        raise AuthError(f"give {token_from} or {auth_from}, not both")
    if token is not None:
        if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
            raise AuthError(
                f"{token_from}: use at least {MIN_TOKEN} characters without spaces, e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe())'`"
            )
        return Credentials(token=token)
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise AuthError(f"{auth_from}: expected user:password")
        if len(password) < 8:
            raise AuthError(f"{auth_from}: the password needs at least 8 characters")
        return Credentials(user=user, password=password)
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def require_for_host(host: str, creds: Credentials | None) -> None:
    """Off loopback, no credentials = no start (one line saying how to give them)."""
    if creds is None and not is_loopback(host):
        raise AuthError(
            f"--host {host} serves beyond this machine: give --token (or {TOKEN_ENV}) or --auth "
            f"user:password (or {AUTH_ENV}); every request then needs them"
        )


class AuthMiddleware:
    """Pure ASGI middleware in front of the whole app (FastAPI routes and the mounted Gradio app alike)."""

    def __init__(self, app: Any, creds: Credentials):
        self.app = app
        self.creds = creds
        self.cookie = creds.session()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self._allowed(headers):
            await self.app(scope, receive, send)
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        given = query.pop("token", None)
        if scope["type"] == "http" and given is not None and self.creds.accepts(None, given):
            rest = urlencode(query)
            location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
            await _respond(
                send,
                303,
                b"",
                [(b"location", location.encode("latin-1")), (b"set-cookie", _cookie(self.cookie, scope))],
            )
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _respond(
            send,
            401,
            b"authentication required: a token or user:password (see `dynaip serve -h`)\n",
            [(b"www-authenticate", b'Basic realm="DynaIP", charset="UTF-8"')],
        )

    def _allowed(self, headers: dict[str, str]) -> bool:
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.cookie.encode()):
                return True
        scheme, _, value = headers.get("authorization", "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and value:
            return self.creds.accepts(None, value)
        if scheme == "basic" and value:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return bool(sep) and self.creds.accepts(user, password)
        return False


def _cookie(value: str, scope: dict) -> bytes:
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    return f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{secure}".encode("latin-1")


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
