"""GET /api/stats: what was captured, delivered, dropped and evicted; the store, the
programs (with run counts while the kernel counts them), the HTTP layer's counters."""
from __future__ import annotations

from ..event import rfc3339
from .base import App

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


def bpf_stats_enabled() -> bool:
    """The kernel counts program runs only while sysctl kernel.bpf_stats_enabled is on."""
    try:
        with open(BPF_STATS_SYSCTL) as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def routes(app: App) -> None:
    monitor = app.monitor

    @app.get("/api/stats")
    def stats():
        """What was captured, delivered, dropped and evicted; the store, programs, uptime."""
        body = monitor.stats()
        counted = bpf_stats_enabled()
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
        body["http"] = app.server_stats()
        if app.exporter is not None:
            body["otlp"] = app.exporter.stats()
        return body
