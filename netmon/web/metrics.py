"""GET /metrics: Prometheus text format from a private registry whose one collector reads
the monitor's counters at scrape time. Nothing here runs per event. Labels are bounded:
no pid, address, port or command."""
from __future__ import annotations

from typing import Callable, Iterator

import bottle
from prometheus_client import CollectorRegistry, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from .. import __version__, _core
from ..monitor import Monitor
from .base import App

# the classic text format (0.0.4) that generate_latest writes and every scraper reads
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)


class _Collector:
    def __init__(self, monitor: Monitor, server_stats: Callable[[], dict]):
        self._monitor, self._server_stats = monitor, server_stats

    def collect(self) -> Iterator[Metric]:
        m = self._monitor
        stats = m.stats()
        attempts = CounterMetricFamily(
            "netmon_connect_attempts", "connect() attempts captured, by what happened to "
            "them, the same on both backends: ok, the errno name of the failure (from "
            "connect() or the TCP handshake), unknown (the backend cannot tell), pending "
            "(its handshake's outcome could no longer be joined); a TCP attempt is counted "
            "when its handshake ends", labels=("family", "protocol", "result"))
        for labels, n in sorted(m.attempts().items()):
            attempts.add_metric(labels, n)
        yield attempts
        yield GaugeMetricFamily("netmon_connect_attempts_in_flight", "TCP attempts waiting "
                                "for their handshake's outcome, not yet in "
                                "netmon_connect_attempts", value=stats["handshakes_in_flight"])
        yield CounterMetricFamily("netmon_events_captured", "events the kernel saw: "
                                  "delivered + dropped", value=stats["captured"])
        yield CounterMetricFamily("netmon_events_delivered", "events that reached the store",
                                  value=stats["delivered"])
        dropped = CounterMetricFamily("netmon_events_dropped", "events the kernel could not "
                                      "deliver, by reason", labels=("reason",))
        for reason, n in sorted(stats["dropped"].items()):
            dropped.add_metric((reason,), n)
        yield dropped
        yield CounterMetricFamily("netmon_events_evicted", "events overwritten in the full "
                                  "store", value=stats["evicted"])
        lost = CounterMetricFamily("netmon_outcomes_lost", "TCP handshake outcomes never "
                                   "joined to their connect event", labels=("reason",))
        for reason, n in sorted(stats["outcomes_lost"].items()):
            lost.add_metric((reason,), n)
        yield lost
        yield from _dns_metrics(stats["dns"])
        yield GaugeMetricFamily("netmon_store_events", "events held in the store",
                                value=stats["size"])
        yield GaugeMetricFamily("netmon_store_capacity", "events the store can hold",
                                value=stats["capacity"])
        if stats["poll_lag_seconds"] is not None:
            yield GaugeMetricFamily("netmon_poll_lag_seconds", "time since the poll thread "
                                    "last drained the kernel ring buffer",
                                    value=stats["poll_lag_seconds"])
        accepts = CounterMetricFamily(
            "netmon_tcp_accepts", "inbound TCP handshakes by result: accepted (a listener "
            "completed it: an accept event), or counted, not stored: closed_port (a SYN "
            "answered with RST), listen_drops (a full accept or SYN queue, netmon's network "
            "namespace)", labels=("result",))
        for result, n in sorted(stats["inbound"].items()):
            accepts.add_metric((result,), n)
        yield accepts
        yield InfoMetricFamily("netmon_build", "netmon's version, libbpf's and the backend",
                               value={"version": __version__,
                                      "libbpf_version": _core.libbpf_version(),
                                      "backend": stats["backend"]})
        http = self._server_stats()
        if "auth_failures" in http:
            yield CounterMetricFamily("netmon_http_auth_failures", "requests refused for a "
                                      "missing or wrong token", value=http["auth_failures"])


def _dns_metrics(dns: dict) -> Iterator[Metric]:
    """The destination-name machinery's counters (only with --dns-names)."""
    if not dns["enabled"]:
        return
    for key, help_text in (
            ("packets", "payloads from source port 53 the kernel passed"),
            ("responses", "well-formed DNS responses parsed"),
            ("answers", "addresses learned from DNS answers"),
            ("evictions", "(net_ns, IP) names evicted from the full name cache"),
            ("parse_failures", "payloads from port 53 that were not a well-formed DNS "
                               "response (or a TCP segment without whole messages)"),
            ("truncated", "DNS payloads longer than the kernel copies, not parsed"),
            ("dropped", "DNS payloads the kernel could not pass (its ring was full)")):
        yield CounterMetricFamily(f"netmon_dns_{key}", help_text, value=dns[key])
    yield GaugeMetricFamily("netmon_dns_names_cached", "(net_ns, IP) keys in the name cache",
                            value=dns["names_cached"])


def registry(monitor: Monitor, server_stats: Callable[[], dict]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one): apps never share."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(monitor, server_stats))
    return reg


def routes(app: App) -> None:
    reg = registry(app.monitor, app.server_stats)

    @app.get("/metrics")
    def prometheus_metrics():
        """Prometheus metrics: connect attempts and accepts by result, drops, store, poll lag."""
        bottle.response.content_type = CONTENT_TYPE
        return generate_latest(reg)
