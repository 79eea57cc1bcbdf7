"""The HTTP API: make_app(monitor) returns a Bottle app that only reads from the monitor.

Every answer is JSON, errors included: {"error": "<reason phrase>", "message": "..."}.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import logging
import re
import threading
import time
from typing import Callable, Optional

import bottle
from prometheus_client import generate_latest

from . import __version__, _core, metrics, openapi
from .event import rfc3339
from .filters import FilterError, compile_filter, parse_time
from .monitor import Monitor

log = logging.getLogger("netmon.api")

MAX_BODY_BYTES = 16 * 1024
MAX_DURATION = 3600
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_PID = 2**32 - 1
COMM_BYTES = _core.COMM_LEN - 1  # the NUL-terminated comm of the record

DURATION_MSG = f"duration must be between 1 and {MAX_DURATION} seconds"
PID_MSG = "pid must be a positive integer"
LIMIT_MSG = f"limit must be between 1 and {MAX_LIMIT}"
COMMAND_MSG = f"command must be a non-empty string of at most {COMM_BYTES} characters"
JSON_MSG = "invalid JSON request body"

MAX_EVENTS_LIMIT = 10000
DEFAULT_TOP_DURATION, DEFAULT_TOP_LIMIT = 60, 10
MAX_STREAMS = 32  # concurrent /api/events/stream clients; the server adds a thread for each
STREAM_RETRY_AFTER = 5  # seconds, in the 429 past MAX_STREAMS
STREAM_BATCH = 1000  # events per store query while streaming
STREAM_POLL_SECONDS = 0.05
KEEPALIVE_SECONDS = 15.0  # an idle stream sends a comment this often
BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"

# query parameters of the endpoints that filter (validated by filters.compile_filter)
FILTER_PARAMS = ("pid", "command", "family", "protocol", "port", "dest", "result", "kind")
EVENTS_PARAMS = FILTER_PARAMS + ("since", "until", "after", "limit")
STREAM_PARAMS = FILTER_PARAMS + ("since", "until", "after")
TOP_PARAMS = FILTER_PARAMS + ("by", "duration", "limit")
_NUMERIC_PARAMS = {"pid", "port", "after", "limit", "duration"}
_MIN_TIME = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


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


def _params(allowed) -> dict:
    """The query string, checked: an unknown or repeated parameter is a 400 naming it;
    decimal text becomes an int where a number is expected; empty values are absent."""
    try:
        query = bottle.request.query.decode()
    except UnicodeError:
        raise _bad_request("the query string is not valid UTF-8") from None
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise _bad_request(f"unknown query parameter {', '.join(unknown)}; "
                           f"allowed: {', '.join(allowed)}")
    out = {}
    for key in query:
        values = query.getall(key)
        if len(values) > 1:
            raise FilterError(key, "given more than once")
        if values[0]:
            v = values[0]
            out[key] = int(v) if key in _NUMERIC_PARAMS and re.fullmatch(r"[0-9]{1,20}", v) else v
    return out


def _bounded(params: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FilterError(name, f"must be an integer between {lo} and {hi}")
    return value


def _filters(params: dict) -> dict:
    """Monitor filter keywords from query parameters, checked by filters.compile_filter
    (its FilterError names the parameter: a 400). An age like 300s becomes an instant now,
    so a stream's window does not slide."""
    f = {k: params[k] for k in FILTER_PARAMS if k in params}
    if f.get("kind") == "all":
        f["kind"] = None
    now = _dt.datetime.now(_dt.timezone.utc)
    for k in ("since", "until"):
        if k in params:
            t = parse_time(k, params[k])
            f[k] = now - min(t, now - _MIN_TIME) if isinstance(t, _dt.timedelta) else t
    if "after" in params:
        f["after_seq"] = params["after"]
    compile_filter(**f)
    return f


def _instant(t: _dt.datetime) -> str:
    try:
        return rfc3339(t.astimezone(_dt.timezone.utc))
    except OverflowError:  # year 1 or 9999 moved past the calendar's edge
        return t.isoformat()


def _understood(f: dict) -> dict:
    """The filters as the store applies them: names normalised, times absolute (RFC 3339),
    networks canonical."""
    kind = f.get("kind", "connect")
    out = {"kind": "all" if kind is None else kind.lower()}
    for k, v in f.items():
        if k in ("family", "protocol"):
            out[k] = v.lower()
        elif k == "result":
            out[k] = v if v in ("ok", "error") else v.upper()
        elif k == "dest":
            out[k] = v if v[0] in "/@" else str(ipaddress.ip_network(v, strict=False))
        elif k in ("since", "until"):
            out[k] = _instant(v)
        elif k == "after_seq":
            out["after"] = v
        elif k != "kind":
            out[k] = v
    return out


def _top_entry(by: str, ev, count: int, failed: int) -> dict:
    key = {"destination": {"destination": ev.destination},
           "command": {"command": ev.command},
           "pid": {"pid": ev.pid, "command": ev.command},
           "port": {"port": ev.port, "service": ev.service},
           "error": {"error": ev.error, "return_code": ev.return_code}}[by]
    return {**key, "count": count, "failed": failed, "last_seen": rfc3339(ev.timestamp)}


def _bpf_stats_enabled() -> bool:
    """The kernel counts program runs only while sysctl kernel.bpf_stats_enabled is on."""
    try:
        with open(BPF_STATS_SYSCTL) as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def _sse(event: str, seq: int, data: dict) -> str:
    return f"event: {event}\nid: {seq}\ndata: {json.dumps(data)}\n\n"


def _follow(monitor: Monitor, f: dict, cursor: int, shutdown: threading.Event, release):
    """The body of an event stream: matching events after `cursor` as they arrive; a gap
    event when the store overwrote events past the cursor before they could be sent (the
    count includes events that would not have matched); a keepalive comment when idle.
    Ends when `shutdown` is set; release() frees the stream's slot."""
    try:
        yield ": netmon event stream\n\n"  # the headers go out now
        idle_since = time.monotonic()
        while not shutdown.is_set():
            last = monitor.seq_range()[1]
            evs, _ = monitor.query(limit=STREAM_BATCH, newest=False, after_seq=cursor, **f)
            # after the query: what the store no longer held when it ran is older than this
            resumed = min(monitor.seq_range()[0], evs[0].seq if evs else last + 1)
            if cursor + 1 < resumed:
                yield _sse("gap", resumed - 1, {"missed": resumed - cursor - 1,
                                                "first_seq": cursor + 1,
                                                "last_seq": resumed - 1})
            if evs:
                yield "".join(_sse(e.kind, e.seq, e.to_dict()) for e in evs)
                cursor, idle_since = evs[-1].seq, time.monotonic()
            if len(evs) < STREAM_BATCH:
                cursor = max(cursor, last)  # nothing else up to `last` matched
                if time.monotonic() - idle_since >= KEEPALIVE_SECONDS:
                    yield ": keepalive\n\n"
                    idle_since = time.monotonic()
                shutdown.wait(STREAM_POLL_SECONDS)
    finally:
        release()


def _log_faults(callback):
    """Bottle plugin: an unexpected exception is logged with its traceback and answered
    with a plain 500; the traceback never reaches the client."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except FilterError as e:  # a query parameter, named in the message
            raise _bad_request(str(e)) from None
        except Exception:
            log.exception("%s %s failed", bottle.request.method, bottle.request.path)
            raise bottle.HTTPError(500, "internal server error; the netmon log has details") \
                from None
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


def make_app(monitor: Monitor, server_stats: Optional[Callable[[], dict]] = None,
             shutdown: Optional[threading.Event] = None) -> bottle.Bottle:
    """A Bottle app answering questions about `monitor`'s events; it never changes them.
    server_stats: the HTTP layer's counters (auth failures, ...) for /api/stats and
    /metrics. shutdown: set by the server when it stops; open event streams then end."""
    server_stats = server_stats or dict
    shutdown = shutdown if shutdown is not None else threading.Event()
    streams = threading.BoundedSemaphore(MAX_STREAMS)
    registry = metrics.registry(monitor, server_stats)
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
                "events_evicted": stats["evicted"], "backend": stats["backend"]}
        if stats["missing_hooks"]:
            body["missing_hooks"] = stats["missing_hooks"]
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

    @app.get("/api/events")
    def events():
        """Events matching the filters, newest last; page on with after=<next_after>."""
        params = _params(EVENTS_PARAMS)
        limit = _bounded(params, "limit", DEFAULT_LIMIT, 1, MAX_EVENTS_LIMIT)
        f = _filters(params)
        paging = "after" in params  # the oldest `limit` after it, else the newest `limit`
        last = monitor.seq_range()[1]  # read first: whatever the query missed is newer
        evs, matched = monitor.query(limit=limit, newest=not paging, **f)
        truncated = matched > len(evs)
        if paging and truncated:
            next_after = evs[-1].seq
        else:  # every match up to `last` was returned
            next_after = max([last, f.get("after_seq", 0)] + [e.seq for e in evs[-1:]])
        return {"events": [e.to_dict() for e in evs], "count": len(evs), "matched": matched,
                "next_after": next_after, "truncated": truncated,
                "filters": {**_understood(f), "limit": limit}}

    @app.get("/api/events/stream")
    def stream():
        """Server-Sent Events: matching events as they happen; resumes from Last-Event-ID."""
        params = _params(STREAM_PARAMS)
        last_id = bottle.request.get_header("Last-Event-ID")
        if last_id is not None:  # a reconnecting EventSource: it wins over after=
            if not re.fullmatch(r"[0-9]{1,18}", last_id.strip()):
                raise FilterError("Last-Event-ID", "must be the id of an event (a seq number)")
            params["after"] = int(last_id)
        f = _filters(params)
        cursor = f.pop("after_seq", None)
        if cursor is None:
            cursor = monitor.seq_range()[1]  # from now on
        if not streams.acquire(blocking=False):
            err = bottle.HTTPError(429, f"at most {MAX_STREAMS} event streams at once; "
                                        f"retry in {STREAM_RETRY_AFTER} s")
            err.set_header("Retry-After", str(STREAM_RETRY_AFTER))
            raise err
        bottle.response.content_type = "text/event-stream"
        bottle.response.set_header("Cache-Control", "no-cache")
        bottle.response.set_header("X-Accel-Buffering", "no")
        return _follow(monitor, f, cursor, shutdown, streams.release)

    @app.get("/api/top")
    def top():
        """The top talkers of the last `duration` seconds, with how many of each failed."""
        params = _params(TOP_PARAMS)
        by = params.get("by", "destination")
        duration = _bounded(params, "duration", DEFAULT_TOP_DURATION, 1, MAX_DURATION)
        limit = _bounded(params, "limit", DEFAULT_TOP_LIMIT, 1, MAX_LIMIT)
        f = _filters({**params, "since": f"{duration}s"})
        rows, groups, matched = monitor.top(by, limit, **f)
        return {"by": by, "duration": duration, "limit": limit,
                "top": [_top_entry(by, *row) for row in rows], "groups": groups,
                "matched": matched, "filters": _understood(f)}

    @app.get("/api/stats")
    def stats():
        """What was captured, delivered, dropped and evicted; the store, programs, uptime."""
        body = monitor.stats()
        counted = _bpf_stats_enabled()
        if body["oldest_timestamp"] is not None:
            body["oldest_timestamp"] = rfc3339(body["oldest_timestamp"])
        body["bpf_stats_enabled"] = counted
        body["programs"] = {name: {"id": p["id"],
                                   "run_cnt": p["run_cnt"] if counted else None,
                                   "run_time_ns": p["run_time_ns"] if counted else None}
                            for name, p in monitor.program_stats().items()}
        body["connect_attempts"] = [
            {"family": fam, "protocol": proto, "result": result, "count": n}
            for (fam, proto, result), n in sorted(monitor.attempts().items())]
        body["http"] = server_stats()
        return body

    @app.get("/metrics")
    def prometheus_metrics():
        """Prometheus metrics: connect attempts by result, drops, store, poll lag."""
        bottle.response.content_type = metrics.CONTENT_TYPE
        return generate_latest(registry)

    @app.get("/openapi.json")
    def openapi_document():
        """This API, described in OpenAPI 3.1."""
        return openapi.SPEC

    return app
