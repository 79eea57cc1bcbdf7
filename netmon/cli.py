"""`netmon` / `python -m netmon`: capture connect() calls and serve the HTTP API."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from . import __version__, systemd
from .monitor import BACKENDS, DEFAULT_CAPACITY, DEFAULT_RINGBUF_BYTES, Monitor, MonitorError
from .web import make_app
from .web.guard import Guard, SecurityError, is_loopback, read_token
from .web.server import Server, ServerError, ShutdownSignals, host_port

log = logging.getLogger("netmon")

DEFAULT_ADDR = "127.0.0.1:8080"
LOG_LEVELS = ("debug", "info", "warning", "error")
EXIT_RUNTIME, EXIT_USAGE = 1, 2
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


class UsageError(Exception):
    """A bad flag or environment value: exit 2 with one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit
        raise UsageError(message)


def parse_addr(text: str) -> Tuple[str, int]:
    """'HOST:PORT', '[IPv6]:PORT' or ':PORT' -> (host, port). ':PORT' means every
    interface, IPv4 and IPv6, as in Go: the dual-stack '::'."""
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.%\w]+)\]|([^:\[\]]*)):([0-9]{1,5})", text)
    if not m or int(m.group(3)) > 65535:
        raise argparse.ArgumentTypeError(
            f"invalid address {text!r}: expected HOST:PORT, [IPv6]:PORT or :PORT "
            "with a port from 0 to 65535")
    return m.group(1) or m.group(2) or "::", int(m.group(3))


def _count(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use 1 or 0)")
    return value in ("1", "true", "yes", "on")


def _backend(text: str) -> str:
    if text.lower() not in BACKENDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(BACKENDS)}")
    return text.lower()


def _level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.lower()


# dest -> (environment variable, converter, default) for every flag that has one
SETTINGS: Dict[str, Tuple[str, Callable, object]] = {
    "addr": ("NETMON_ADDR", parse_addr, parse_addr(DEFAULT_ADDR)),
    "capacity": ("NETMON_CAPACITY", _count, DEFAULT_CAPACITY),
    "ringbuf_size": ("NETMON_RINGBUF_SIZE", _count, DEFAULT_RINGBUF_BYTES),
    "backend": ("NETMON_BACKEND", _backend, "auto"),
    "udp_sends": ("NETMON_UDP_SENDS", _bool, False),
    "cgroup": ("NETMON_CGROUP", str, None),
    "log_level": ("NETMON_LOG_LEVEL", _level, "info"),
    "auth_token_file": ("NETMON_AUTH_TOKEN_FILE", str, None),
    "allow_unauthenticated_remote": ("NETMON_ALLOW_UNAUTHENTICATED_REMOTE", _bool, False),
    "cors_origin": ("NETMON_CORS_ORIGIN", str, ""),
    "tls_cert": ("NETMON_TLS_CERT", str, None),
    "tls_key": ("NETMON_TLS_KEY", str, None),
    "user": ("NETMON_USER", str, None),
    "debug": ("NETMON_DEBUG", _bool, False),
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netmon", allow_abbrev=False, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Watch every connect() on this host with eBPF and answer "
                            "questions about them over HTTP.")
    # defaults stay None so that apply_env() can tell "not given" from a value
    p.add_argument("--addr", "-addr", type=parse_addr, metavar="HOST:PORT",
                   help=f"where the API listens (default {DEFAULT_ADDR}; env NETMON_ADDR)")
    p.add_argument("--capacity", type=_count, metavar="N",
                   help=f"events kept in memory, oldest overwritten first "
                        f"(default {DEFAULT_CAPACITY}; env NETMON_CAPACITY)")
    p.add_argument("--ringbuf-size", type=_count, metavar="BYTES",
                   help=f"kernel ring buffer size, a power of two "
                        f"(default {DEFAULT_RINGBUF_BYTES}; env NETMON_RINGBUF_SIZE)")
    p.add_argument("--backend", type=_backend, metavar="NAME",
                   help="auto (cgroup where the kernel and privileges allow, else syscall), "
                        "cgroup (hooks on the cgroup v2 root: no cost to other syscalls, "
                        "sees io_uring) or syscall (tracepoints on connect: exact return "
                        "codes for every family) (default auto; env NETMON_BACKEND)")
    p.add_argument("--udp-sends", action="store_true", default=None,
                   help="also count unconnected UDP datagrams (sendto), one event per "
                        "process and destination per second (env NETMON_UDP_SENDS=1)")
    p.add_argument("--cgroup", metavar="PATH",
                   help="watch only the processes in this cgroup v2 directory and below it "
                        "(a container, a systemd unit) instead of the whole host "
                        "(env NETMON_CGROUP)")
    p.add_argument("--log-level", type=_level, metavar="LEVEL",
                   help=f"one of {', '.join(LOG_LEVELS)} (default info; env NETMON_LOG_LEVEL)")
    p.add_argument("--debug", action="store_true", default=None,
                   help="log every captured event and every API request (env NETMON_DEBUG=1)")
    sec = p.add_argument_group("access and privilege")
    sec.add_argument("--auth-token-file", metavar="PATH",
                     help="require 'Authorization: Bearer <token>' on every path but /health; "
                          "the file must be mode 600 (env NETMON_AUTH_TOKEN_FILE); needed to "
                          "listen on a non-loopback address")
    sec.add_argument("--allow-unauthenticated-remote", action="store_true", default=None,
                     help="listen on a non-loopback address without a token: anyone who can "
                          "reach the port sees every process's destinations "
                          "(env NETMON_ALLOW_UNAUTHENTICATED_REMOTE=1)")
    sec.add_argument("--cors-origin", metavar="ORIGINS",
                     help="comma-separated origins allowed to read the API from a browser "
                          "(default none; env NETMON_CORS_ORIGIN)")
    sec.add_argument("--tls-cert", metavar="PATH", help="serve HTTPS with this certificate "
                     "(PEM; with --tls-key; env NETMON_TLS_CERT)")
    sec.add_argument("--tls-key", metavar="PATH", help="the certificate's private key "
                     "(PEM; env NETMON_TLS_KEY)")
    sec.add_argument("--user", metavar="NAME",
                     help="switch to this user once the programs are attached (every "
                          "capability is dropped then anyway; env NETMON_USER)")
    p.add_argument("--version", action="version", version=f"netmon {__version__}")
    return p


def apply_env(args: argparse.Namespace, environ: Mapping[str, str]) -> argparse.Namespace:
    """Fill each setting not given as a flag from its NETMON_* variable, else its default."""
    for dest, (var, convert, default) in SETTINGS.items():
        if getattr(args, dest) is not None:
            continue
        raw = environ.get(var)
        try:
            setattr(args, dest, default if raw is None else convert(raw))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"environment variable {var}: {e}") from None
    return args


def parse_args(argv: Optional[Sequence[str]] = None,
               environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    return apply_env(build_parser().parse_args(argv), environ)


def _log_events(monitor: Monitor) -> None:
    """--debug: log each event, following the store from outside the capture path."""
    last = monitor.seq_range()[1]
    while monitor.running:
        for ev in monitor.follow(after_seq=last, timeout=1.0, kind=None):
            last = ev.seq
            log.debug("event %s", json.dumps(ev.to_dict()))


def _fail(message: str, code: int) -> int:
    print(f"netmon: error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    level = "debug" if args.debug else args.log_level
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(level.upper())
    host, port = args.addr
    if bool(args.tls_cert) != bool(args.tls_key):
        return _fail("--tls-cert and --tls-key go together (see netmon --help)", EXIT_USAGE)
    try:
        token = read_token(args.auth_token_file) if args.auth_token_file else None
    except SecurityError as e:
        return _fail(str(e), EXIT_USAGE)
    loopback = is_loopback(host)
    if not loopback and token is None and not args.allow_unauthenticated_remote:
        return _fail(f"refusing to listen on {host_port(host, port)} without authentication: "
                     "netmon shows every process's network destinations; configure a token "
                     "with --auth-token-file (or NETMON_AUTH_TOKEN_FILE), or pass "
                     "--allow-unauthenticated-remote to accept the risk", EXIT_USAGE)
    try:
        monitor = Monitor(capacity=args.capacity, ringbuf_bytes=args.ringbuf_size,
                          backend=args.backend, udp_sends=args.udp_sends,
                          drop_privileges=True, user=args.user, cgroup=args.cgroup)
    except ValueError as e:
        return _fail(f"{e} (see netmon --help)", EXIT_USAGE)
    except MemoryError as e:
        return _fail(f"{e}; lower --capacity", EXIT_RUNTIME)
    guard = Guard(None, token=token, check_host=loopback,
                  cors_origins=[o.strip() for o in args.cors_origin.split(",") if o.strip()])
    shutdown = threading.Event()  # Server.stop() sets it: open event streams end
    guard.app = make_app(monitor, server_stats=guard.stats, shutdown=shutdown)
    try:
        server = Server(guard, host, port, shutdown=shutdown,
                        tls=(args.tls_cert, args.tls_key) if args.tls_cert else None)
    except ServerError as e:
        return _fail(str(e), EXIT_USAGE)
    with ShutdownSignals() as signals:
        try:
            server.bind()  # before loading BPF, so a busy port fails fast
        except ServerError as e:
            return _fail(str(e), EXIT_RUNTIME)
        try:
            monitor.start()  # attaches, then drops every capability (and becomes --user)
        except MonitorError as e:
            server.stop()
            cause, _, detail = str(e).partition("\n")
            if detail:
                log.debug("%s", detail)
                cause += " (--debug shows the verifier log)"
            return _fail(cause, EXIT_RUNTIME)
        code = 0
        try:
            server.start()
            if level == "debug":
                threading.Thread(target=_log_events, args=(monitor,), name="netmon-debug",
                                 daemon=True).start()
            print(f"netmon {__version__} listening on {server.url}; {monitor.backend} backend, "
                  f"attached {', '.join(monitor.programs)}; storing up to "
                  f"{monitor.capacity} events", flush=True)
            for missing in monitor.missing_hooks:
                log.warning("not available on this kernel: %s", missing)
            systemd.notify("READY=1")
            code = _serve_until_stopped(monitor, signals)
        finally:
            systemd.notify("STOPPING=1")
            server.stop()
            monitor.stop()
    return code


def _serve_until_stopped(monitor: Monitor, signals: ShutdownSignals) -> int:
    """Until SIGTERM/SIGINT (exit 0), or until the poll thread dies (exit 1): serving
    data that silently stopped updating would be worse than stopping."""
    fault = os.environ.get(FAULT_ENV)
    if fault:  # tests only: make the poll thread fail after this many seconds
        threading.Timer(float(fault), monitor._inject_poll_failure).start()
    while True:
        sig = signals.wait(timeout=1.0)
        if sig is not None:
            log.info("%s received, shutting down", sig.name)
            return 0
        if not monitor.polling:
            log.error("capture stopped: %s; exiting", monitor.health()[1])
            return EXIT_RUNTIME


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["trace"]:
        from .trace import main as trace_main
        return trace_main(argv[1:])
    if argv[:1] == ["serve"]:  # the explicit form of the default
        argv = argv[1:]
    try:
        args = parse_args(argv)
    except UsageError as e:
        return _fail(f"{e} (see netmon --help)", EXIT_USAGE)
    except SystemExit as e:  # --help, --version
        return e.code
    return run(args)

