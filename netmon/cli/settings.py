"""What every netmon command shares: the settings table (flag, environment variable,
default, parser), the flag parsers, and how a command fails (one line on stderr, exit 1
at run time or 2 for a bad flag or environment value)."""
from __future__ import annotations

import argparse
import platform
import re
import sys
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

from .. import _core, logfmt
from .._version import __version__
from ..identity import DEFAULT_RUNTIME_ROOTS, RUNTIMES
from ..logfmt import LOG_FORMATS
from ..monitor import (
    BACKENDS,
    DEFAULT_CAPACITY,
    DEFAULT_RINGBUF_BYTES,
    MAX_CAPACITY,
    MAX_RINGBUF_BYTES,
)

DEFAULT_ADDR = "127.0.0.1:8080"
LOG_LEVELS = ("debug", "info", "warning", "error")
EXIT_RUNTIME, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """A bad flag or environment value: exit 2 with one line on stderr."""


class Failure(Exception):
    """The command cannot go on: this one line on stderr, this exit code."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit
        raise UsageError(message)


def version_line() -> str:
    """`netmon --version`: netmon's version and those of the libbpf and Python it runs
    on, which differ between a pip install (the host's) and the single binary (its own)."""
    libbpf = _core.libbpf_version().lstrip("v")
    return f"netmon {__version__} (libbpf {libbpf}, Python {platform.python_version()})"


def fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def parse(parser: argparse.ArgumentParser, argv: Sequence[str],
          environ: Mapping[str, str]) -> argparse.Namespace:
    """argv's settings; each command's parser sets `finish`, which completes and checks
    them (raising UsageError), and `run`."""
    args = parser.parse_args(argv)
    return args.finish(args, environ)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str], prog: str,
                environ: Mapping[str, str]) -> int:
    """Parse argv and run the command it names: a usage error is one line, exit 2; a
    Failure one line and its exit code."""
    try:
        args = parse(parser, argv, environ)
    except UsageError as e:
        return fail(prog, f"{e} (see {prog} --help)", EXIT_USAGE)
    except SystemExit as e:  # --help, --version
        return e.code
    try:
        return args.run(args)
    except Failure as e:
        if getattr(args, "log_format", "text") == "json":  # a log collector parses stderr
            print(logfmt.line("json", f"{prog}: error: {e}", "error"), file=sys.stderr)
            return e.code
        return fail(prog, str(e), e.code)


# ---- parsers: text -> value, or argparse.ArgumentTypeError naming what is wrong ----

def parse_addr(text: str) -> Tuple[str, int]:
    """'HOST:PORT', '[IPv6]:PORT' or ':PORT' -> (host, port). ':PORT' means every
    interface, IPv4 and IPv6, as in Go: the dual-stack '::'."""
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.%\w]+)\]|([^:\[\]]*)):([0-9]{1,5})", text)
    if not m or int(m.group(3)) > 65535:
        raise argparse.ArgumentTypeError(
            f"invalid address {text!r}: expected HOST:PORT, [IPv6]:PORT or :PORT "
            "with a port from 0 to 65535")
    return m.group(1) or m.group(2) or "::", int(m.group(3))


def count_up_to(most: int) -> Callable[[str], int]:
    """A parser of decimal counts no larger than `most` (the checks past it, such as a
    minimum, are the Monitor's)."""
    def count(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
        if len(text.lstrip("0")) > len(str(most)) or int(text) > most:
            raise argparse.ArgumentTypeError(f"{text} is too large (at most {most})")
        return int(text)
    return count


count = count_up_to(2**63 - 1)


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use 1 or 0)")
    return value in ("1", "true", "yes", "on")


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text.lower()
    return parse


def runtime_roots(text: str) -> dict:
    """'containerd=/a:/b,docker=/c' -> {"containerd": ["/a", "/b"], "docker": ["/c"]}."""
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, dirs = item.partition("=")
        if not eq or name not in RUNTIMES or not dirs:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not RUNTIME=DIR[:DIR...] with RUNTIME one of {', '.join(RUNTIMES)}")
        out[name] = [d for d in dirs.split(":") if d]
    return out


backend = _one_of(BACKENDS)
level = _one_of(LOG_LEVELS)
log_format = _one_of(LOG_FORMATS)


# ---- the settings table ----

class Setting(NamedTuple):
    """A setting from its flags or, when none is given, its environment variable, else
    its default. `parse` reads both; `boolean` ones are switches (the flag means true)."""
    flags: Tuple[str, ...]
    env: str
    default: object
    parse: Callable[[str], object]
    help: str
    metavar: Optional[str] = None
    group: Optional[str] = None  # the --help section, when not the main one

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")


ACCESS = "access and privilege"
EXPORT = "event export (OpenTelemetry, needs the otlp extra)"
SETTINGS = (
    Setting(("--addr", "-addr"), "NETMON_ADDR", parse_addr(DEFAULT_ADDR), parse_addr,
            f"where the API listens (default {DEFAULT_ADDR}; env NETMON_ADDR)", "HOST:PORT"),
    Setting(("--capacity",), "NETMON_CAPACITY", DEFAULT_CAPACITY, count_up_to(MAX_CAPACITY),
            f"events kept in memory, oldest overwritten first "
            f"(default {DEFAULT_CAPACITY}; env NETMON_CAPACITY)", "N"),
    Setting(("--ringbuf-size",), "NETMON_RINGBUF_SIZE", DEFAULT_RINGBUF_BYTES,
            count_up_to(MAX_RINGBUF_BYTES),
            f"kernel ring buffer size, a power of two "
            f"(default {DEFAULT_RINGBUF_BYTES}; env NETMON_RINGBUF_SIZE)", "BYTES"),
    Setting(("--backend",), "NETMON_BACKEND", "auto", backend,
            "auto (cgroup where the kernel and privileges allow, else syscall), "
            "cgroup (hooks on the cgroup v2 root: no cost to other syscalls, "
            "sees io_uring) or syscall (tracepoints on connect: exact return "
            "codes for every family) (default auto; env NETMON_BACKEND)", "NAME"),
    Setting(("--udp-sends",), "NETMON_UDP_SENDS", False, boolean,
            "also count unconnected UDP datagrams (sendto), one event per "
            "process and destination per second (env NETMON_UDP_SENDS=1)"),
    Setting(("--dns-names",), "NETMON_DNS_NAMES", False, boolean,
            "name destinations from the DNS answers processes receive (UDP/TCP port 53): "
            "destination_name on events, the name= filter, top by name; costs a "
            "cgroup_skb program on every received packet (env NETMON_DNS_NAMES=1)"),
    Setting(("--cgroup",), "NETMON_CGROUP", None, str,
            "watch only the processes in this cgroup v2 directory and below it "
            "(a container, a systemd unit) instead of the whole host "
            "(env NETMON_CGROUP)", "PATH"),
    Setting(("--runtime-roots",), "NETMON_RUNTIME_ROOTS", None, runtime_roots,
            "where container runtimes keep their state, read for container, pod and "
            "namespace names: RUNTIME=DIR[:DIR],... (a DaemonSet mounts the host's there); "
            "runtimes not named keep their defaults: " + ", ".join(
                f"{k}={':'.join(v)}" for k, v in DEFAULT_RUNTIME_ROOTS.items())
            + " (env NETMON_RUNTIME_ROOTS)", "ROOTS"),
    Setting(("--log-level",), "NETMON_LOG_LEVEL", "info", level,
            f"one of {', '.join(LOG_LEVELS)} (default info; env NETMON_LOG_LEVEL)", "LEVEL"),
    Setting(("--log-format",), "NETMON_LOG_FORMAT", "text", log_format,
            "text, or json: one JSON object a line (time, level, logger, msg), the "
            "startup line included (default text; env NETMON_LOG_FORMAT)", "FORMAT"),
    Setting(("--debug",), "NETMON_DEBUG", False, boolean,
            "log every captured event and every API request (env NETMON_DEBUG=1)"),
    Setting(("--auth-token-file",), "NETMON_AUTH_TOKEN_FILE", None, str,
            "require 'Authorization: Bearer <token>' on every path but /health; "
            "the file must be mode 600 (env NETMON_AUTH_TOKEN_FILE); needed to "
            "listen on a non-loopback address", "PATH", ACCESS),
    Setting(("--allow-unauthenticated-remote",), "NETMON_ALLOW_UNAUTHENTICATED_REMOTE", False,
            boolean, "listen on a non-loopback address without a token: anyone who can "
            "reach the port sees every process's destinations "
            "(env NETMON_ALLOW_UNAUTHENTICATED_REMOTE=1)", None, ACCESS),
    Setting(("--cors-origin",), "NETMON_CORS_ORIGIN", "", str,
            "comma-separated origins allowed to read the API from a browser "
            "(default none; env NETMON_CORS_ORIGIN)", "ORIGINS", ACCESS),
    Setting(("--tls-cert",), "NETMON_TLS_CERT", None, str,
            "serve HTTPS with this certificate (PEM; with --tls-key; env NETMON_TLS_CERT)",
            "PATH", ACCESS),
    Setting(("--tls-key",), "NETMON_TLS_KEY", None, str,
            "the certificate's private key (PEM; env NETMON_TLS_KEY)", "PATH", ACCESS),
    Setting(("--user",), "NETMON_USER", None, str,
            "switch to this user once the programs are attached (every "
            "capability is dropped then anyway; env NETMON_USER)", "NAME", ACCESS),
    Setting(("--otlp-endpoint",), "OTEL_EXPORTER_OTLP_ENDPOINT", None, str,
            "send every event as an OpenTelemetry log record to this OTLP/HTTP collector "
            "(base URL; /v1/logs is appended; env OTEL_EXPORTER_OTLP_ENDPOINT, or "
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT as the full URL). OTEL_EXPORTER_OTLP_HEADERS, "
            "_TIMEOUT, _COMPRESSION, OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply",
            "URL", EXPORT),
)


def add_settings(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag. Defaults stay None, so that apply_env() can tell "not
    given" from a value."""
    groups = {None: parser}
    for s in SETTINGS:
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(s.group)
        if s.parse is boolean:
            groups[s.group].add_argument(*s.flags, action="store_true", default=None,
                                         help=s.help)
        else:
            groups[s.group].add_argument(*s.flags, type=s.parse, metavar=s.metavar,
                                         help=s.help)


def apply_env(args: argparse.Namespace, environ: Mapping[str, str]) -> argparse.Namespace:
    """Fill each setting not given as a flag from its NETMON_* variable, else its default."""
    for s in SETTINGS:
        if getattr(args, s.dest) is not None:
            continue
        raw = environ.get(s.env)
        try:
            setattr(args, s.dest, s.default if raw is None else s.parse(raw))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"environment variable {s.env}: {e}") from None
    return args
