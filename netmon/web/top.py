"""GET /api/top: the largest groups (by destination, command, pid, port, error, for
accepts service (local port + listener command) and client (remote address), or who
connected: cgroup, unit, container, pod, namespace, exe) of the last `duration` seconds."""
from __future__ import annotations

from ..event import rfc3339
from ..filters import FILTER_NAMES, int_in
from .base import App
from .limits import MAX_DURATION, MAX_LIMIT
from .params import request_filter, request_params, understood

TOP_PARAMS = FILTER_NAMES + ("by", "duration", "limit")
DEFAULT_TOP_DURATION, DEFAULT_TOP_LIMIT = 60, 10


def _top_entry(by: str, ev, count: int, failed: int) -> dict:
    key = {"destination": {"destination": ev.destination},
           "command": {"command": ev.command},
           "pid": {"pid": ev.pid, "command": ev.command},
           "port": {"port": ev.port, "service": ev.service},
           "error": {"error": ev.error, "return_code": ev.return_code},
           "service": {"port": ev.port, "command": ev.command, "service": ev.service},
           "client": {"source_ip": ev.source_ip},
           "name": {"name": ev.destination_name},
           "cgroup": {"cgroup_id": ev.cgroup_id, "cgroup": ev.cgroup},
           "unit": {"unit": ev.unit},
           "container": {"container_runtime": ev.container_runtime,
                         "container_id": ev.container_id,
                         "container_name": ev.container_name, "pod_name": ev.pod_name,
                         "pod_namespace": ev.pod_namespace},
           "pod": {"pod_uid": ev.pod_uid, "pod_name": ev.pod_name,
                   "pod_namespace": ev.pod_namespace, "pod_qos": ev.pod_qos},
           "namespace": {"pod_namespace": ev.pod_namespace},
           "exe": {"exe": ev.exe}}[by]
    return {**key, "count": count, "failed": failed, "last_seen": rfc3339(ev.timestamp)}


def routes(app: App) -> None:
    monitor = app.monitor

    @app.get("/api/top")
    def top():
        """The top talkers of the last `duration` seconds, with how many of each failed."""
        params = request_params(TOP_PARAMS)
        by = params.get("by", "destination")
        duration = int_in("duration", params.get("duration", DEFAULT_TOP_DURATION), 1,
                          MAX_DURATION)
        limit = int_in("limit", params.get("limit", DEFAULT_TOP_LIMIT), 1, MAX_LIMIT)
        where = request_filter({**params, "since": f"{duration}s"})
        rows, groups, matched = monitor.top(by, limit, where)
        return {"by": by, "duration": duration, "limit": limit,
                "top": [_top_entry(by, *row) for row in rows], "groups": groups,
                "matched": matched, "filters": understood(where)}
