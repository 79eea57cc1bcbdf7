"""GET /api/events (a page of matching events, with a cursor) and GET /api/events/stream
(Server-Sent Events as they happen, resumable from Last-Event-ID)."""
from __future__ import annotations

import json
import re
import threading
import time

import bottle

from ..event import events_json
from ..filters import FILTER_NAMES, Filter, FilterError, int_in
from ..monitor import Follower, Monitor
from .base import App, RawJSON, json_answer
from .limits import DEFAULT_LIMIT, MAX_EVENTS_LIMIT, MAX_STREAMS
from .params import request_filter, request_params, understood

EVENTS_PARAMS = FILTER_NAMES + ("since", "until", "after", "limit")
STREAM_PARAMS = FILTER_NAMES + ("since", "until", "after")
STREAM_RETRY_AFTER = 5  # seconds, in the 429 past MAX_STREAMS
STREAM_BATCH = 1000  # events per store query while streaming
STREAM_POLL_SECONDS = 0.05
KEEPALIVE_SECONDS = 15.0  # an idle stream sends a comment this often


def _sse(event: str, seq: int, data: dict) -> str:
    return f"event: {event}\nid: {seq}\ndata: {json.dumps(data)}\n\n"


def _follow(monitor: Monitor, where: Filter, cursor: int, shutdown: threading.Event,
            release):
    """The body of an event stream: matching events after `cursor` as they arrive, each
    once its TCP handshake's outcome is known (or the monitor's hold bound passed: then
    as pending),
    so a client never has to patch an event; a gap event when the store overwrote events
    past the cursor before they could be sent (the count includes events that would not
    have matched); a keepalive comment when idle. Ends when `shutdown` is set; release()
    frees the stream's slot."""
    try:
        yield ": netmon event stream\n\n"  # the headers go out now
        follower = Follower(monitor, cursor, where)
        idle_since = time.monotonic()
        while not shutdown.is_set():
            evs = follower.next(STREAM_BATCH)
            if follower.gap:
                first, last = follower.gap
                yield _sse("gap", last, {"missed": last - first + 1, "first_seq": first,
                                         "last_seq": last})
            if evs:
                yield "".join(_sse(e.kind, e.seq, e.to_dict()) for e in evs)
                idle_since = time.monotonic()
            if len(evs) < STREAM_BATCH:
                if time.monotonic() - idle_since >= KEEPALIVE_SECONDS:
                    yield ": keepalive\n\n"
                    idle_since = time.monotonic()
                shutdown.wait(STREAM_POLL_SECONDS)
    finally:
        release()


def routes(app: App) -> None:
    monitor = app.monitor
    streams = threading.BoundedSemaphore(MAX_STREAMS)

    @app.get("/api/events")
    def events():
        """Events matching the filters, newest last; page on with after=<next_after>."""
        params = request_params(EVENTS_PARAMS)
        limit = int_in("limit", params.get("limit", DEFAULT_LIMIT), 1, MAX_EVENTS_LIMIT)
        where = request_filter(params)
        paging = "after" in params  # the oldest `limit` after it, else the newest `limit`
        last = monitor.seq_range()[1]  # read first: whatever the query missed is newer
        evs, matched = monitor.query(limit, not paging, where)
        truncated = matched > len(evs)
        if paging and truncated:
            next_after = evs[-1].seq
        else:  # every match up to `last` was returned
            next_after = max([last, params.get("after", 0)] + [e.seq for e in evs[-1:]])
        return json_answer({"events": RawJSON(events_json(evs)), "count": len(evs),
                            "matched": matched, "next_after": next_after,
                            "truncated": truncated,
                            "filters": {**understood(where), "limit": limit}})

    @app.get("/api/events/stream")
    def stream():
        """Server-Sent Events: matching events as they happen; resumes from Last-Event-ID."""
        params = request_params(STREAM_PARAMS)
        # the raw (latin-1) value: Bottle's get_header decodes it as UTF-8 and raises on
        # bytes that are not
        last_id = bottle.request.environ.get("HTTP_LAST_EVENT_ID")
        if last_id is not None:  # a reconnecting EventSource: it wins over after=
            if not re.fullmatch(r"[0-9]{1,18}", last_id.strip()):
                raise FilterError("Last-Event-ID", "must be the id of an event (a seq number)")
            params["after"] = int(last_id)
        where = request_filter(params)
        cursor = params.get("after")
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
        return _follow(monitor, where, cursor, shutdown=app.shutdown, release=streams.release)
