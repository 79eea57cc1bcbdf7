"""`netmon serve`, the default command: capture connect() calls and serve the HTTP API."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from typing import Mapping, Optional, Tuple

from .. import logfmt, systemd
from .._version import __version__
from ..monitor import Monitor, MonitorError
from ..web import make_app
from ..web.guard import Guard, SecurityError, is_loopback, read_token
from ..web.server import SERVICE_SIGNALS, Server, ServerError, ShutdownSignals, host_port
from .settings import EXIT_RUNTIME, EXIT_USAGE, Failure, add_settings, apply_env, version_line

log = logging.getLogger("netmon")

PROG = "netmon"
SUMMARY = "capture connects and serve the HTTP API (the default command)"
FAULT_ENV = "NETMON_TEST_POLL_FAILURE_AFTER"  # tests: seconds until the poll thread fails

EPILOG = """\
examples:
  netmon                          listen on 127.0.0.1:8080
  netmon --addr :9090             all interfaces, port 9090 (Go-style -addr also works)
  netmon --addr [::1]:8080        IPv6 loopback
  netmon --capacity 100000 --debug
  NETMON_ADDR=127.0.0.1:9000 netmon
  netmon serve --addr :9090       the same: serve is the explicit form
  netmon trace --help             print connects as they happen, no server

  curl -s 127.0.0.1:8080/health
  curl -s -X POST 127.0.0.1:8080/api/connection-summary -d '{"command": "curl", "duration": 60}'
  curl -s "127.0.0.1:8080/api/list-connections?limit=10"
  curl -s "127.0.0.1:8080/api/events?command=curl&result=error&since=300s"
  curl -sN 127.0.0.1:8080/api/events/stream
  curl -s 127.0.0.1:8080/openapi.json     every endpoint, described

Every flag can also come from the environment variable named in its help; a flag wins.
netmon needs root (or CAP_BPF and CAP_PERFMON) and a kernel with BTF.
"""
PARSER = dict(description="Watch every connect() on this host with eBPF and answer "
                          "questions about them over HTTP.",
              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_settings(parser)
    parser.add_argument("--version", action="version", version=version_line())
    return parser


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_flags(parser).set_defaults(finish=finish, run=run)
    return parser


def finish(args: argparse.Namespace, environ: Mapping[str, str]) -> argparse.Namespace:
    return apply_env(args, environ)


def run(args: argparse.Namespace) -> int:
    """Check the settings, build the monitor and the server, bind, attach, then serve
    until stopped. Each step raises Failure, which ends the command with one line."""
    level = _configure_logging(args)
    token, loopback = _check_access(args)
    monitor = _build_monitor(args)
    exporter = _build_exporter(args, monitor)
    guard = Guard(None, token=token, check_host=loopback,
                  cors_origins=[o.strip() for o in args.cors_origin.split(",") if o.strip()])
    server = _build_server(args, monitor, guard, exporter)
    with ShutdownSignals(also=SERVICE_SIGNALS) as signals:
        try:
            server.bind()  # before loading BPF, so a busy port fails fast
        except ServerError as e:
            raise Failure(str(e)) from None
        _start_capture(monitor, server)
        try:
            if exporter is not None:
                exporter.start()
            _go_live(server, monitor, level, args.log_format)
            return _serve_until_stopped(monitor, signals, _SignalActions(args, monitor, guard))
        finally:
            systemd.notify("STOPPING=1")
            server.stop()
            if exporter is not None:
                exporter.stop()
            monitor.stop()


def _configure_logging(args: argparse.Namespace) -> str:
    level = "debug" if args.debug else args.log_level
    handler = logging.StreamHandler()
    handler.setFormatter(logfmt.formatter(args.log_format))
    logging.basicConfig(handlers=[handler])
    log.setLevel(level.upper())
    return level


def _check_access(args: argparse.Namespace) -> Tuple[Optional[str], bool]:
    """(the bearer token or None, whether the address is loopback). A remote address
    needs a token, or the explicit acceptance of the risk."""
    host, port = args.addr
    if bool(args.tls_cert) != bool(args.tls_key):
        raise Failure("--tls-cert and --tls-key go together (see netmon --help)", EXIT_USAGE)
    try:
        token = read_token(args.auth_token_file) if args.auth_token_file else None
    except SecurityError as e:
        raise Failure(str(e), EXIT_USAGE) from None
    loopback = is_loopback(host)
    if not loopback and token is None and not args.allow_unauthenticated_remote:
        raise Failure(f"refusing to listen on {host_port(host, port)} without authentication: "
                      "netmon shows every process's network destinations; configure a token "
                      "with --auth-token-file (or NETMON_AUTH_TOKEN_FILE), or pass "
                      "--allow-unauthenticated-remote to accept the risk", EXIT_USAGE)
    return token, loopback


def _build_monitor(args: argparse.Namespace) -> Monitor:
    try:
        return Monitor(capacity=args.capacity, ringbuf_bytes=args.ringbuf_size,
                       backend=args.backend, udp_sends=args.udp_sends,
                       dns_names=args.dns_names,
                       drop_privileges=True, user=args.user, cgroup=args.cgroup,
                       runtime_roots=args.runtime_roots)
    except ValueError as e:
        raise Failure(f"{e} (see netmon --help)", EXIT_USAGE) from None
    except MemoryError as e:
        raise Failure(f"{e}; lower --capacity") from None


def _build_exporter(args: argparse.Namespace, monitor: Monitor):
    """The OTLP event exporter when an endpoint is configured, else None."""
    if not (args.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")):
        return None
    from .. import otlp  # the otlp extra: imported only when asked for
    try:
        return otlp.Exporter(monitor, otlp.config(args.otlp_endpoint, os.environ))
    except otlp.ConfigError as e:
        raise Failure(str(e), EXIT_USAGE) from None


def _build_server(args: argparse.Namespace, monitor: Monitor, guard: Guard,
                  exporter=None) -> Server:
    shutdown = threading.Event()  # Server.stop() sets it: open event streams end
    servers: list = []  # the server, once built: its counters join the guard's

    def http_stats() -> dict:
        return {**guard.stats(), **(servers[0].stats() if servers else {})}
    guard.app = make_app(monitor, server_stats=http_stats, shutdown=shutdown,
                         exporter=exporter)
    host, port = args.addr
    try:
        servers.append(Server(guard, host, port, shutdown=shutdown,
                              tls=(args.tls_cert, args.tls_key) if args.tls_cert else None))
    except ServerError as e:
        raise Failure(str(e), EXIT_USAGE) from None
    return servers[0]


def _start_capture(monitor: Monitor, server: Server) -> None:
    try:
        monitor.start()  # attaches, then drops every capability (and becomes --user)
    except MonitorError as e:
        server.stop()
        cause, _, detail = str(e).partition("\n")
        if detail:
            log.debug("%s", detail)
            cause += " (--debug shows the verifier log)"
        raise Failure(cause) from None


def _go_live(server: Server, monitor: Monitor, level: str, log_format: str) -> None:
    """Serve, say so (stdout, the log, systemd)."""
    server.start()
    if level == "debug":
        threading.Thread(target=_log_events, args=(monitor,), name="netmon-debug",
                         daemon=True).start()
    print(logfmt.line(log_format, f"netmon {__version__} listening on {server.url}; "
                      f"{monitor.backend} backend, attached {', '.join(monitor.programs)}; "
                      f"storing up to {monitor.capacity} events"), flush=True)
    for missing in monitor.missing_hooks:
        log.warning("not available on this kernel: %s", missing)
    systemd.notify("READY=1")


def _log_events(monitor: Monitor) -> None:
    """--debug: log each event, following the store from outside the capture path."""
    last = monitor.seq_range()[1]
    while monitor.running:
        for ev in monitor.follow(after_seq=last, timeout=1.0, kind=None):
            last = ev.seq
            log.debug("event %s", json.dumps(ev.to_dict()))


class _SignalActions:
    """What the service signals do: SIGHUP re-reads the token file (tokens rotate without
    a restart; a file that became unusable keeps the old token), SIGUSR1 logs a status
    line, SIGUSR2 is logged and ignored."""

    def __init__(self, args: argparse.Namespace, monitor: Monitor, guard: Guard):
        self.token_file, self.monitor, self.guard = args.auth_token_file, monitor, guard

    def __call__(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            self._reload_token()
        elif sig == signal.SIGUSR1:
            s = self.monitor.stats()
            log.info("SIGUSR1: status: %d events captured, %d dropped, %d held of %d, "
                     "poll lag %.3f s, %s", s["captured"], s["dropped_total"], s["size"],
                     s["capacity"], s["poll_lag_seconds"] or 0.0,
                     "healthy" if self.monitor.health()[0] else "unhealthy")
        else:
            log.info("%s received: netmon does nothing on it; ignored", sig.name)

    def _reload_token(self) -> None:
        if not self.token_file:
            log.info("SIGHUP received: no --auth-token-file to re-read; nothing changed")
            return
        try:
            self.guard.set_token(read_token(self.token_file))
        except SecurityError as e:
            log.error("SIGHUP received: %s; still using the previous token", e)
            return
        log.info("SIGHUP received: re-read the token file %s", self.token_file)


def _serve_until_stopped(monitor: Monitor, signals: ShutdownSignals,
                         on_signal: _SignalActions) -> int:
    """Until SIGTERM/SIGINT (exit 0), or until the poll thread dies (exit 1): serving
    data that silently stopped updating would be worse than stopping. Under a systemd
    watchdog, WATCHDOG=1 goes out only while the poll loop is healthy (attached, polling,
    draining the ring), so a stalled capture gets the service restarted."""
    fault = os.environ.get(FAULT_ENV)
    if fault:  # tests only: make the poll thread fail after this many seconds
        threading.Timer(float(fault), monitor._inject_poll_failure).start()
    ping = systemd.watchdog_interval()
    next_ping = 0.0
    while True:
        sig = signals.wait(timeout=1.0 if ping is None else min(1.0, ping))
        if sig in SERVICE_SIGNALS:
            on_signal(sig)
        elif sig is not None:
            log.info("%s received, shutting down", sig.name)
            return 0
        if not monitor.polling:
            log.error("capture stopped: %s; exiting", monitor.health()[1])
            return EXIT_RUNTIME
        if ping is not None and time.monotonic() >= next_ping:
            healthy, why = monitor.health()
            if healthy:
                systemd.notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping
            else:
                log.warning("not pinging the systemd watchdog: %s", why)
