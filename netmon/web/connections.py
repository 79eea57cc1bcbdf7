"""POST /api/connection-summary (one pid's or command's attempts over a window) and
GET|POST /api/list-connections (each process's latest attempts)."""
from __future__ import annotations

import datetime as _dt

from ..event import events_json
from ..filters import int_in
from ..names import name_bytes
from .base import App, RawJSON, json_answer
from .limits import COMM_BYTES, DEFAULT_LIMIT, MAX_ANSWER_EVENTS, MAX_DURATION, MAX_LIMIT, MAX_PID
from .params import bad_request, request_params

DURATION_MSG = f"duration must be between 1 and {MAX_DURATION} seconds"
PID_MSG = "pid must be a positive integer"
LIMIT_MSG = f"limit must be between 1 and {MAX_LIMIT}"
COMMAND_MSG = f"command must be a non-empty string of at most {COMM_BYTES} characters"


def _command(value) -> str:
    try:  # a name as answers show it (name_bytes): \xNN is a byte that is not UTF-8
        raw = name_bytes(value) if isinstance(value, str) else b""
        ok = 0 < len(raw) <= COMM_BYTES and b"\0" not in raw  # a comm cannot hold a NUL
    except UnicodeEncodeError:  # a lone surrogate, from a JSON \ud800 escape
        ok = False
    if not ok:
        raise bad_request(COMMAND_MSG)
    return value


def routes(app: App) -> None:
    monitor = app.monitor

    @app.post("/api/connection-summary")
    def connection_summary():
        """Count one pid's or command's connect() attempts over the last `duration` seconds."""
        body = request_params()
        duration = int_in("duration", body.get("duration"), 1, MAX_DURATION, DURATION_MSG)
        pid, command = body.get("pid"), body.get("command")
        if pid is not None and command is not None:
            raise bad_request("cannot specify both pid and command")
        if pid is None and command is None:
            raise bad_request("must specify either pid or command")
        if pid is not None:
            pid = int_in("pid", pid, 1, MAX_PID, PID_MSG)
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
        # an answer's memory is bounded: at most MAX_ANSWER_EVENTS, the newest, and
        # truncated says so
        params = request_params()
        pid, limit = params.get("pid"), params.get("limit")
        if pid is not None:
            pid = int_in("pid", pid, 1, MAX_PID, PID_MSG)
        limit = DEFAULT_LIMIT if limit is None else int_in("limit", limit, 1, MAX_LIMIT,
                                                           LIMIT_MSG)
        per_pid, truncated = monitor.latest_per_pid(limit, pid=pid,
                                                    max_total=MAX_ANSWER_EVENTS)
        total = sum(len(events) for events in per_pid.values())
        return json_answer({
            "total_pids": len(per_pid),
            "connections": {str(p): RawJSON(events_json(per_pid[p])) for p in sorted(per_pid)},
            "truncated": truncated,
            "message": f"Found {total} total connections across {len(per_pid)} processes"})
