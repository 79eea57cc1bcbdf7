"""GET /metrics: Prometheus text format from a private registry whose collectors read the
monitor's counters at scrape time, plus prometheus_client's process and platform
collectors (netmon's own CPU, memory, fds; the Python it runs on). Nothing here runs per
event: the TCP handshake histogram is kept in C by the store as outcomes arrive and only
read here. Labels are bounded: no pid, address, port or command."""
from __future__ import annotations

from datetime import timedelta
from typing import Callable, Iterator

import bottle
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    exposition,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from .. import __version__, _core
from ..monitor import Monitor
from .base import App
from .stats import bpf_stats_enabled

# the classic text format (0.0.4) that generate_latest writes and every scraper reads
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)


def _by_reason(name: str, doc: str, counts: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=("reason",))
    for reason, n in sorted(counts.items()):
        family.add_metric((reason,), n)
    return family


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
        yield _by_reason("netmon_events_dropped", "events the kernel could not deliver, by "
                         "reason", stats["dropped"])
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
        if "host_rejected" in http:
            yield CounterMetricFamily("netmon_http_host_rejected", "requests refused for a "
                                      "Host that is not a loopback name (DNS rebinding)",
                                      value=http["host_rejected"])
        if "connections_refused" in http:
            yield CounterMetricFamily("netmon_http_connections_refused", "connections refused "
                                      "at the per-client or total cap (503)",
                                      value=http["connections_refused"])
        if "answers_cut" in http:
            yield CounterMetricFamily("netmon_http_answers_cut", "answers whose client did not "
                                      "take them in time: the connection was reset",
                                      value=http["answers_cut"])


FAILING_TOP, FAILING_WINDOW, FAILING_AMONG = 10, 300, 1000


class _FailingDestinations:
    """The destinations with the most failed connects (refused, timed out, reset, ...)
    over the last FAILING_WINDOW seconds, from the store's top-N in C at scrape time: at
    most FAILING_TOP series, so the label stays bounded on any one scrape."""

    def __init__(self, monitor: Monitor):
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "netmon_failing_destination_connects",
            f"failed connect attempts over the last {FAILING_WINDOW} s to each of the "
            f"{FAILING_TOP} destinations with the most (among the {FAILING_AMONG} busiest)",
            labels=("destination",))
        rows, _, _ = self._monitor.top("destination", FAILING_AMONG,
                                       since=timedelta(seconds=FAILING_WINDOW))
        failing = sorted(((failed, str(ev.destination)) for ev, _, failed in rows if failed),
                         key=lambda r: (-r[0], r[1]))
        for failed, dest in failing[:FAILING_TOP]:
            g.add_metric((dest,), failed)
        yield g


class _ExportCollector:
    """The OTLP exporter's counters: what it sent, what it could not, what waits."""

    def __init__(self, exporter):
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        st = self._exporter.stats()
        yield CounterMetricFamily("netmon_otlp_events_sent", "events the OTLP collector "
                                  "accepted", value=st["sent"])
        yield _by_reason("netmon_otlp_events_dropped", "events never sent: queue_full (the "
                         "collector was down too long), evicted (the store overwrote them "
                         "first), rejected (the collector refused them)", st["dropped"])
        yield CounterMetricFamily("netmon_otlp_retries", "export attempts that failed and "
                                  "were retried after a back-off", value=st["retries"])
        yield GaugeMetricFamily("netmon_otlp_queue_events", "events batched and waiting to "
                                "be sent", value=st["queued"])


class _KernelCollector:
    """The programs' own cost in the kernel (ebpf_exporter's metrics, netmon_-prefixed and
    labelled by program name) and the TCP handshake latency histogram."""

    def __init__(self, monitor: Monitor):
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        counted = bpf_stats_enabled()
        yield GaugeMetricFamily("netmon_bpf_stats_enabled", "1 while sysctl "
                                "kernel.bpf_stats_enabled makes the kernel count program "
                                "runs (the run metrics are absent otherwise)",
                                value=int(counted))
        programs = self._monitor.program_stats()
        info = InfoMetricFamily("netmon_ebpf_program", "the BPF programs attached, by name "
                                "and kernel id", labels=("program", "id"))
        run_time = CounterMetricFamily("netmon_ebpf_program_run_time_seconds", "time the "
                                       "program has spent running in the kernel",
                                       labels=("program",))
        run_count = CounterMetricFamily("netmon_ebpf_program_run_count", "times the "
                                        "program has run", labels=("program",))
        for name, p in sorted(programs.items()):
            info.add_metric((name, str(p["id"])), {})
            run_time.add_metric((name,), p["run_time_ns"] / 1e9)
            run_count.add_metric((name,), p["run_cnt"])
        yield info
        if counted:
            yield run_time
            yield run_count
        h = self._monitor.handshakes()
        hist = HistogramMetricFamily("netmon_tcp_handshake_seconds", "TCP handshakes from "
                                     "SYN sent to established or failed, timed in the kernel",
                                     labels=("outcome",))
        bounds = [f"{b / 1e6:g}" for b in h["bounds_us"]] + ["+Inf"]
        for outcome in ("established", "failed"):
            total, buckets = 0, []
            for le, n in zip(bounds, h[outcome]):
                total += n
                buckets.append((le, total))
            hist.add_metric((outcome,), buckets, h[f"{outcome}_us"] / 1e6)
        yield hist


def _dns_metrics(dns: dict) -> Iterator[Metric]:
    """The destination-name machinery's counters (only with --dns-names)."""
    if not dns["enabled"]:
        return
    for key, help_text in (
            ("packets", "payloads from source port 53 the kernel passed"),
            ("responses", "well-formed DNS responses parsed"),
            ("answers", "addresses learned from DNS answers"),
            ("evictions", "(net_ns, IP) names evicted from the full name cache"),
            ("parse_failures", "DNS messages from port 53 that were not a well-formed "
                               "response"),
            ("tcp_gaps", "partial DNS-over-TCP answers dropped at a lost or reordered "
                         "segment"),
            ("truncated", "DNS payloads longer than the kernel copies, not parsed"),
            ("dropped", "DNS payloads the kernel could not pass (its ring was full)")):
        yield CounterMetricFamily(f"netmon_dns_{key}", help_text, value=dns[key])
    yield GaugeMetricFamily("netmon_dns_names_cached", "(net_ns, IP) keys in the name cache",
                            value=dns["names_cached"])


def registry(monitor: Monitor, server_stats: Callable[[], dict],
             exporter=None) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one): apps never share."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(monitor, server_stats))
    reg.register(_KernelCollector(monitor))
    reg.register(_FailingDestinations(monitor))
    if exporter is not None:
        reg.register(_ExportCollector(exporter))
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    return reg


def routes(app: App) -> None:
    reg = registry(app.monitor, app.server_stats, app.exporter)

    @app.get("/metrics")
    def prometheus_metrics():
        """Prometheus metrics: connect attempts and accepts by result, drops, store, poll lag."""
        bottle.response.content_type = CONTENT_TYPE
        return generate_latest(reg)
