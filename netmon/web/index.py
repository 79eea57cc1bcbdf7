"""GET / (the endpoints, each with the first line of its handler's docstring; the live
page for a browser) and GET /health (liveness)."""
from __future__ import annotations

import bottle

from .. import __version__
from . import page
from .base import App


def routes(app: App) -> None:
    monitor = app.monitor

    @app.get("/")
    def index():
        """This list of endpoints."""
        bottle.response.set_header("Vary", "Accept")
        if page.prefers_html(bottle.request.get_header("Accept", "")):  # a browser
            return page.answer(page.INDEX)
        return {
            "service": "netmon",
            "version": __version__,
            "description": "Watches every connect() on this host with eBPF",
            "endpoints": {f"{r.method} {r.rule}": r.callback.__doc__.strip().splitlines()[0]
                          for r in app.api_routes()},
        }

    @app.get("/health")
    def health():
        """Liveness: 200 while the BPF programs are attached and polled, else 503."""
        ok, reason = monitor.health()
        stats = monitor.stats()
        body = {"status": "healthy" if ok else "unhealthy", "service": "netmon",
                "version": __version__, "uptime_seconds": round(stats["uptime_seconds"], 3),
                "events_captured": stats["captured"], "events_dropped": stats["dropped_total"],
                "events_evicted": stats["evicted"], "backend": stats["backend"]}
        if stats["missing_hooks"]:
            body["missing_hooks"] = stats["missing_hooks"]
        if not ok:
            body["reason"] = reason
            bottle.response.status = 503
        return body
