"""One JSON POST to a judge server with a whole-request deadline, safe redirects and redacted secrets.

Why not ``urllib.request.urlopen``: its ``timeout`` bounds each socket operation, so a server that
sends its headers a byte at a time holds a request for as long as it likes; and its redirect handler
copies the ``Authorization`` header to whatever host a redirect names. Here (``post_json``):

- ``deadline_s`` bounds the whole request, redirects included: a timer shuts the socket down when
  it passes, which ends any blocked read at once;
- 307 / 308 (and 301 / 302 / 303, re-sent as the same POST: a chat-completions endpoint has no GET)
  are followed at most ``MAX_REDIRECTS`` times; the ``Authorization`` header goes only to the
  origin (scheme, host, port) it was configured for;
- ``Redactor`` removes the API key from any text before it reaches an error or a log line (a
  server may echo the header it got, e.g. in a 401 body).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


class Redactor:
    """Replaces every occurrence of the secrets in a text with ``***``."""

    def __init__(self, *secrets: str | None):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: object) -> str:
        out = str(text)
        for s in self.secrets:
            out = out.replace(s, "***")
        return out


class DeadlineExceeded(TimeoutError):
    """The request as a whole ran past its deadline."""


@dataclass
class Response:
    status: int
    body: bytes
    url: str


def _origin(url: str) -> tuple[str, str, int]:
    u = urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or (443 if u.scheme == "https" else 80)


def _once(url: str, data: bytes, headers: dict[str, str], deadline: float) -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(url)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed before the request was sent")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    kwargs = {"context": ssl.create_default_context()} if u.scheme == "https" else {}
    conn = cls(u.hostname, u.port, timeout=remaining, **kwargs)
    expired = threading.Event()

    def cut() -> None:  # unblocks a read that a slow server keeps alive byte by byte
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(remaining, cut)
    timer.daemon = True
    timer.start()
    try:
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn.request("POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if expired.is_set():
            raise DeadlineExceeded("the server did not finish its answer in time")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set():
            raise DeadlineExceeded("the server did not finish its answer in time") from None
        raise e
    finally:
        timer.cancel()
        conn.close()


def post_json(url: str, body: dict, *, deadline_s: float, auth: str | None = None) -> Response:
    """POSTs ``body``; follows redirects (dropping ``auth`` off its origin); the whole exchange ends by ``deadline_s``."""
    data = json.dumps(body).encode()
    deadline = time.monotonic() + deadline_s
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        if auth and _origin(url) == origin:
            headers["Authorization"] = f"Bearer {auth}"
        status, resp_headers, payload = _once(url, data, headers, deadline)
        if status in REDIRECTS and "location" in resp_headers:
            url = urljoin(url, resp_headers["location"])
            if urlsplit(url).scheme not in ("http", "https"):
                raise http.client.HTTPException(f"redirect to a non-HTTP URL {url!r}")
            continue
        return Response(status, payload, url)
    raise http.client.HTTPException(f"more than {MAX_REDIRECTS} redirects")
