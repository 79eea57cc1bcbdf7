"""The HTTP API: make_app(monitor) returns a Bottle app that only reads from the monitor.

Every answer is JSON, errors included: {"error": "<reason phrase>", "message": "..."}.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from typing import Callable, Optional

import bottle

from . import __version__
from .monitor import Monitor

log = logging.getLogger("netmon.api")

MAX_BODY_BYTES = 16 * 1024
MAX_DURATION = 3600
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_PID = 2**32 - 1
COMM_BYTES = 15  # TASK_COMM_LEN - 1

DURATION_MSG = f"duration must be between 1 and {MAX_DURATION} seconds"
PID_MSG = "pid must be a positive integer"
LIMIT_MSG = f"limit must be between 1 and {MAX_LIMIT}"
COMMAND_MSG = f"command must be a non-empty string of at most {COMM_BYTES} characters"
JSON_MSG = "invalid JSON request body"


def error_body(status: int, message: str) -> str:
    """The JSON body of every error answer, from the app and from the server alike."""
    return json.dumps({"error": bottle.HTTP_CODES.get(status, "Unknown"), "message": message})


def _bad_request(message: str) -> bottle.HTTPError:
    return bottle.HTTPError(400, message)


def _int_in(value, lo: int, hi: int, message: str) -> int:
    """value as an int in [lo, hi], else a 400 with message. Booleans are not integers."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad_request(message)
    return value


def _query() -> dict:
    """The query string as a dict: decimal text becomes an int, empty values are absent."""
    return {k: int(v) if re.fullmatch(r"[0-9]{1,20}", v) else v
            for k, v in bottle.request.query.items() if v}


def _no_duplicate_keys(pairs) -> dict:
    """{"pid": 1, "pid": 2} is ambiguous: refuse it rather than pick one."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _json_object() -> dict:
    """The request body as a JSON object: 411 if chunked, 413 past MAX_BODY_BYTES, 400 if
    not a JSON object."""
    if bottle.request.chunked:  # servers de-chunk differently; a length is simple and safe
        raise bottle.HTTPError(411, "send the body with a Content-Length header, not chunked")
    if bottle.request.content_length > MAX_BODY_BYTES:
        raise bottle.HTTPError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    raw = bottle.request.body.read()
    try:
        body = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except ValueError:  # includes bad UTF-8 and duplicate keys
        raise _bad_request(JSON_MSG) from None
    if not isinstance(body, dict):
        raise _bad_request(JSON_MSG)
    return body


def _command(value) -> str:
    try:
        ok = (isinstance(value, str) and 0 < len(value.encode()) <= COMM_BYTES
              and "\0" not in value)  # the kernel's comm cannot hold a NUL
    except UnicodeEncodeError:  # a lone surrogate, from a JSON \ud800 escape
        ok = False
    if not ok:
        raise _bad_request(COMMAND_MSG)
    return value


def _log_faults(callback):
    """Bottle plugin: an unexpected exception is logged with its traceback and answered
    with a plain 500; the traceback never reaches the client."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except Exception:
            log.exception("%s %s failed", bottle.request.method, bottle.request.path)
            raise bottle.HTTPError(500, "internal server error; the netmon log has details")
    return wrapper


class _App(bottle.Bottle):
    def default_error_handler(self, res: bottle.HTTPError) -> str:
        message = res.body
        if res.status_code == 404:
            message = f"no endpoint at {bottle.request.path}; GET / lists them"
        elif res.status_code == 405:
            message = (f"{bottle.request.method} is not allowed on {bottle.request.path}; "
                       f"allowed: {res.get_header('Allow')}")
        bottle.response.content_type = "application/json"
        return error_body(res.status_code, message)


def make_app(monitor: Monitor, server_stats: Optional[Callable[[], dict]] = None
             ) -> bottle.Bottle:
    """A Bottle app answering questions about `monitor`'s events; it never changes them.
    server_stats: the HTTP layer's counters (auth failures, ...) for /api/stats and
    /metrics."""
    server_stats = server_stats or dict
    app = _App()
    app.install(_log_faults)

    @app.hook("after_request")
    def _log_request():
        log.debug("%s %s -> %s", bottle.request.method, bottle.request.fullpath,
                  bottle.response.status)

    @app.get("/")
    def index():
        """This list of endpoints."""
        return {
            "service": "netmon",
            "version": __version__,
            "description": "Watches every connect() on this host with eBPF",
            "endpoints": {f"{r.method} {r.rule}": r.callback.__doc__.strip().splitlines()[0]
                          for r in app.routes},
        }

    @app.get("/health")
    def health():
        """Liveness: 200 while the BPF programs are attached and polled, else 503."""
        ok, reason = monitor.health()
        stats = monitor.stats()
        body = {"status": "healthy" if ok else "unhealthy", "service": "netmon",
                "version": __version__, "uptime_seconds": round(stats["uptime_seconds"], 3),
                "events_captured": stats["captured"], "events_dropped": stats["dropped_total"],
                "events_evicted": stats["evicted"]}
        if not ok:
            body["reason"] = reason
            bottle.response.status = 503
        return body

    @app.post("/api/connection-summary")
    def connection_summary():
        """Count one pid's or command's connect() attempts over the last `duration` seconds."""
        body = _json_object()
        duration = _int_in(body.get("duration"), 1, MAX_DURATION, DURATION_MSG)
        pid, command = body.get("pid"), body.get("command")
        if pid is not None and command is not None:
            raise _bad_request("cannot specify both pid and command")
        if pid is None and command is None:
            raise _bad_request("must specify either pid or command")
        if pid is not None:
            pid = _int_in(pid, 1, MAX_PID, PID_MSG)
            who = f"PID {pid}"
        else:
            command = _command(command)
            who = f"command '{command}'"
        total = monitor.count(pid=pid, command=command,
                              since=_dt.timedelta(seconds=duration))
        return {"total_attempts": total, "pid": pid, "command": command, "duration": duration,
                "message": f"Found {total} connection attempts from {who} "
                           f"over {duration} seconds"}

    @app.route("/api/list-connections", method=["GET", "POST"])
    def list_connections():
        """Each process's most recent `limit` connect() attempts (optionally one pid's)."""
        params = _query() if bottle.request.method == "GET" else _json_object()
        pid, limit = params.get("pid"), params.get("limit")
        if pid is not None:
            pid = _int_in(pid, 1, MAX_PID, PID_MSG)
        limit = DEFAULT_LIMIT if limit is None else _int_in(limit, 1, MAX_LIMIT, LIMIT_MSG)
        per_pid, truncated = monitor.latest_per_pid(limit, pid=pid)
        total = sum(len(events) for events in per_pid.values())
        return {"total_pids": len(per_pid),
                "connections": {str(p): [e.to_dict() for e in per_pid[p]]
                                for p in sorted(per_pid)},
                "truncated": truncated,
                "message": f"Found {total} total connections across {len(per_pid)} processes"}

    return app
