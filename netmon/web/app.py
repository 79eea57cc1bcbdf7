"""make_app(monitor): a new App with every resource's routes; no module-level app."""
from __future__ import annotations

import threading
from typing import Callable, Optional

from ..monitor import Monitor
from . import connections, events, index, metrics, openapi, page, stats, top
from .base import App

# in the order GET / lists them (the page's files are not listed)
RESOURCES = (index, connections, events, top, stats, metrics, openapi, page)


def make_app(monitor: Monitor, server_stats: Optional[Callable[[], dict]] = None,
             shutdown: Optional[threading.Event] = None, exporter=None) -> App:
    """A Bottle app answering questions about `monitor`'s events; it never changes them.
    server_stats: the HTTP layer's counters (auth failures, ...) for /api/stats and
    /metrics. shutdown: set by the server when it stops; open event streams then end.
    exporter: the OTLP exporter, if one runs: its counters join /api/stats and /metrics."""
    app = App(monitor, server_stats, shutdown, exporter)
    for resource in RESOURCES:
        resource.routes(app)
    return app
