"""Who may read netmon: a WSGI layer in front of the app.

- A bearer token, when configured, guards every path but /health and the live page's
  files (compared in constant time; failures answer 401 with WWW-Authenticate and are
  counted).
- On a loopback bind, requests whose Host is not a loopback name or address are refused
  (403): a web page cannot reach netmon through DNS rebinding.
- CORS headers only for origins listed explicitly.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import re
import stat
import threading
from typing import Iterable, Optional

from .limits import error_body
from .page import is_public

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
OPEN_PATHS = {"/health"}  # liveness probes need no token


class SecurityError(ValueError):
    """A configuration that would expose netmon unsafely; the message says the way out."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> str:
    """The token in `path`, refusing a file that group or others can read."""
    try:
        st = os.stat(path)
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise SecurityError(f"cannot read the token file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"the token file {path} is readable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
    if len(token) < 16:
        raise SecurityError(f"the token in {path} is shorter than 16 characters: use a long "
                            "random one, e.g. openssl rand -hex 32")
    return token


_HOST = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::[0-9]{1,5})?|([A-Za-z0-9.-]+)(?::[0-9]{1,5})?")


def _host_of(header: str) -> str:
    """The name or address in a Host header; "" unless it is exactly a name, an IPv4
    address or a bracketed IPv6 one, and a port (no zone, no user part, nothing else)."""
    m = _HOST.fullmatch(header)
    return (m.group(1) or m.group(2)) if m else ""


class Guard:
    """WSGI middleware: token, Host check and CORS in front of `app`."""

    def __init__(self, app, *, token: Optional[str] = None, check_host: bool = True,
                 cors_origins: Iterable[str] = ()):
        self.app = app
        self._token = token.encode() if token else None
        self._check_host = check_host
        self._origins = set(cors_origins)
        self._lock = threading.Lock()
        self._counts = {"auth_failures": 0, "host_rejected": 0}

    def set_token(self, token: str) -> None:
        """A new token (a rotated token file, re-read): requests from now on need it."""
        self._token = token.encode()

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    @staticmethod
    def _refuse(start_response, status: int, message: str, headers=()):
        body = error_body(status, message).encode()
        start_response(f"{status} {'Unauthorized' if status == 401 else 'Forbidden'}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))), *headers])
        return [body]

    def __call__(self, environ, start_response):
        host = environ.get("HTTP_HOST")
        if self._check_host and host is not None and not is_loopback(_host_of(host)):
            self._count("host_rejected")
            return self._refuse(start_response, 403, f"Host {host!r} is not a loopback name: "
                                "netmon on a loopback address answers only requests addressed "
                                "to it (DNS rebinding protection)")
        origin = environ.get("HTTP_ORIGIN")
        cors = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")] \
            if origin in self._origins else []
        if cors and environ["REQUEST_METHOD"] == "OPTIONS" \
                and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:  # a preflight
            start_response("204 No Content", cors + [
                ("Access-Control-Allow-Methods", "GET, POST"),
                ("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID"),
                ("Access-Control-Max-Age", "600")])
            return [b""]
        if self._token is not None and environ.get("PATH_INFO") not in OPEN_PATHS \
                and not is_public(environ):  # the page asks for the token itself
            scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.strip().encode(), self._token):
                self._count("auth_failures")
                return self._refuse(start_response, 401,
                                    "missing or wrong bearer token (Authorization: Bearer ...)",
                                    [("WWW-Authenticate", 'Bearer realm="netmon"')] + cors)

        def start(status, headers, exc_info=None):
            return start_response(status, headers + cors, exc_info)

        return self.app(environ, start if cors else start_response)
