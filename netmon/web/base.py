"""What every resource module builds on: App, the Bottle app its routes are registered on.
It carries what the routes read (the monitor, the HTTP layer's counters, the shutdown
event), answers every error as JSON, turns a FilterError into a 400 naming the parameter,
and logs (never leaks) an unexpected exception."""
from __future__ import annotations

import json
import logging
import threading
from typing import Callable, Optional

import bottle

from ..filters import FilterError
from ..monitor import Monitor
from ..names import visible
from .limits import error_body, status_line
from .params import bad_request

log = logging.getLogger("netmon.api")  # the name netmon's log lines have always carried


class RawJSON(str):
    """JSON text, put into an answer as it is (see json_answer)."""


def json_answer(obj: dict) -> str:
    """The answer's JSON, as Bottle's json.dumps writes a dict, where a RawJSON value (at
    any depth of dicts) is already JSON: lists of events come from events_json, ~5x as
    fast as json.dumps of their dicts. Sets the content type."""
    def text(v) -> str:
        if isinstance(v, RawJSON):
            return v
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))}: {text(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)
    bottle.response.content_type = "application/json"
    return text(obj)


def _log_faults(callback):
    """Bottle plugin: an unexpected exception is logged with its traceback and answered
    with a plain 500; the traceback never reaches the client."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except FilterError as e:  # a query parameter, named in the message
            raise bad_request(str(e)) from None
        except Exception:
            log.exception("%s %s failed", visible(bottle.request.method),
                          visible(bottle.request.path))
            raise bottle.HTTPError(500, "internal server error; the netmon log has details") \
                from None
    return wrapper


def _log_request() -> None:
    """--debug: one line per request; a control character from the URL is escaped, so
    that it cannot reach the operator's terminal."""
    if log.isEnabledFor(logging.DEBUG):
        query = bottle.request.query_string
        log.debug("%s %s -> %s", visible(bottle.request.method),
                  visible(bottle.request.path + ("?" + query if query else "")),
                  bottle.response.status)


class App(bottle.Bottle):
    """A Bottle app answering questions about `monitor`'s events; it never changes them.
    server_stats: the HTTP layer's counters (auth failures, ...). shutdown: set when the
    server stops; open event streams then end."""

    def __init__(self, monitor: Monitor, server_stats: Optional[Callable[[], dict]] = None,
                 shutdown: Optional[threading.Event] = None, exporter=None):
        super().__init__()
        self.monitor = monitor
        self.server_stats = server_stats or dict
        self.shutdown = shutdown if shutdown is not None else threading.Event()
        self.exporter = exporter  # the OTLP exporter, when one runs
        self.install(_log_faults)
        self.add_hook("after_request", _log_request)

    def api_routes(self) -> list:
        """The API's routes: all but the page's files (registered with page=True)."""
        return [r for r in self.routes if not r.config.get("page")]

    def wsgi(self, environ, start_response):
        """Bottle's WSGI entry, with netmon's fixed reason phrase on every status line."""
        def start(status, headers, exc_info=None):
            return start_response(status_line(int(status[:3])), headers, exc_info)
        return super().wsgi(environ, start)

    def default_error_handler(self, res: bottle.HTTPError) -> str:
        message = res.body
        if res.status_code == 404:
            message = f"no endpoint at {bottle.request.path}; GET / lists them"
        elif res.status_code == 405:
            message = (f"{bottle.request.method} is not allowed on {bottle.request.path}; "
                       f"allowed: {res.get_header('Allow')}")
        bottle.response.content_type = "application/json"
        return error_body(res.status_code, message)
