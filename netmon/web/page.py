"""The live page. A browser asking GET / for HTML gets static/index.html (index.py asks
prefers_html()); the page's scripts, style and icon are served from /ui/<name>. The files
are package data, read once, and hold no data about the host: the guard serves them
without a token (is_public), and the page asks for the token and sends it, in an
Authorization header, on the API calls that read data."""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Dict, NamedTuple

import bottle

from .base import App

STATIC = Path(__file__).with_name("static")
UI = "/ui/"  # where the page's files are served; not API endpoints (App.api_routes)
INDEX = "index.html"  # served at GET /, not under UI
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# scripts, styles and requests from this origin only; no inline script or style at all
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-cache"}
_RANGE = re.compile(r"\s*([^\s;]+)\s*(?:;(.*))?")
_Q = re.compile(r"(?:^|;)\s*q\s*=\s*([01](?:\.[0-9]{0,3})?)\s*(?:;|$)", re.I)


class File(NamedTuple):
    body: bytes
    content_type: str
    etag: str


def _quality(accept: str, media: str) -> float:
    """The q the Accept header gives `media`: that of its most specific matching range."""
    best, q_best = -1, 0.0
    kind = media.split("/")[0] + "/*"
    for part in accept.split(","):
        m = _RANGE.fullmatch(part)
        if not m:
            continue
        rng = m.group(1).lower()
        rank = {media: 2, kind: 1, "*/*": 0}.get(rng, -1)
        if rank > best:
            q = _Q.search(m.group(2) or "")
            best, q_best = rank, float(q.group(1)) if q else 1.0
    return q_best


def prefers_html(accept: str) -> bool:
    """True when Accept ranks text/html above application/json, as a browser's navigation
    does; curl's */* (or no Accept at all) keeps the JSON answer."""
    return _quality(accept, "text/html") > _quality(accept, "application/json")


def is_public(environ: dict) -> bool:
    """The page and its files: readable without the token (they hold no data)."""
    if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
        return False
    path = environ.get("PATH_INFO", "")
    return path.startswith(UI) or (path == "/" and prefers_html(environ.get("HTTP_ACCEPT", "")))


@functools.lru_cache(maxsize=None)
def files() -> Dict[str, File]:
    """The page's files by name, read once (they are package data and never change)."""
    out = {}
    for p in sorted(STATIC.iterdir()):
        if p.suffix in TYPES:
            body = p.read_bytes()
            out[p.name] = File(body, TYPES[p.suffix],
                               '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return out


def answer(name: str):
    """One of the page's files with its headers (the CSP among them); 304 when the
    browser's copy is current."""
    f = files()[name]
    for k, v in HEADERS.items():
        bottle.response.set_header(k, v)
    bottle.response.set_header("ETag", f.etag)
    if f.etag in bottle.request.get_header("If-None-Match", ""):
        bottle.response.status = 304
        return b""
    bottle.response.content_type = f.content_type
    return f.body


def routes(app: App) -> None:
    @app.get(UI + "<name>", page=True)
    def page_file(name):
        """A file of the live page (script, style, icon)."""
        if name == INDEX or name not in files():  # the page itself is GET /
            raise bottle.HTTPError(404, f"no file {name!r} in the page")
        return answer(name)
