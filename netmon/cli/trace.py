"""`netmon trace`: attach, print one line per connect() as it happens; no server.

The filters are /api/events' (netmon.filters checks them); --json prints Event.to_dict()
lines. A TCP attempt's line waits for its handshake's outcome (at most HOLD_SECONDS, then
it prints as pending), so every line says what happened, with the handshake's latency.
Every line is flushed, so a pipe sees it at once. On exit (--count reached, Ctrl-C,
SIGTERM) a summary of what the kernel dropped and of the holds goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Mapping, Optional, Sequence

from ..event import Event
from ..filters import FAMILY_NAMES, FILTER_NAMES, FilterError, compile_filter
from ..monitor import HOLD_SECONDS, Monitor, MonitorError
from ..names import visible
from .settings import Failure, Parser, UsageError, backend, count, run_command, runtime_roots

PROG = "netmon trace"
SUMMARY = "print connects as they happen, no server"
PARSER = dict(description="Print every connect() on this host as it happens (no server), "
                          "or with --kind accept every TCP connection a listener here "
                          "completed. Filters combine; they are those of GET /api/events.")
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
CAPACITY = 65536  # the store only has to hold what the printer has not reached yet
FAMILIES = {v: k for k, v in FAMILY_NAMES.items()}
LINE = "{:<15}  {:>7}  {:<15}  {:<6}  {:<21}  {:<28}  {:<5}  {:>8}  {:<15}  {}"
HEADER = LINE.format("TIME(UTC)", "PID", "COMMAND", "FAMILY", "SOURCE", "DESTINATION", "PROTO",
                     "LATENCY", "RESULT", "WORKLOAD")


def _number(text: str):
    """Decimal text as an int; anything else is left for compile_filter to name."""
    return int(text) if text.isdecimal() else text


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--pid", type=_number, help="only this process")
    p.add_argument("--command", help="only this command (comm, exact)")
    p.add_argument("--family", help="inet, inet6 or unix")
    p.add_argument("--protocol", help="tcp, udp, ...")
    p.add_argument("--port", type=_number, help="only this destination port")
    p.add_argument("--dest", help="an IP, a CIDR (10.0.0.0/8, ::1/128) or a unix path prefix")
    p.add_argument("--result", help="ok, error, pending, unknown or an errno name like "
                                    "ECONNREFUSED")
    p.add_argument("--src", help="only this source IP or CIDR (a connect's local address, "
                                 "an accept's client)")
    p.add_argument("--sport", type=_number, help="only this source port")
    p.add_argument("--name", help="only connects to this destination name (from the DNS "
                   "answers netmon saw), or *.example.com for any name below it")
    p.add_argument("--numeric", action="store_true",
                   help="print IP addresses, not the destination names DNS answers gave "
                        "(and do not watch DNS answers unless --name asks for a name)")
    p.add_argument("--unit", help="only this systemd unit (nginx.service)")
    p.add_argument("--container", help="only this container (id prefix or name)")
    p.add_argument("--pod", help="only this pod (name or uid)")
    p.add_argument("--namespace", help="only pods in this Kubernetes namespace")
    p.add_argument("--cgroup", help="only cgroups under this path (/system.slice)")
    p.add_argument("--ppid", type=_number, help="only children of this process")
    p.add_argument("--exe", help="only this executable (a path, or a file name)")
    p.add_argument("--runtime-roots", type=runtime_roots, metavar="ROOTS",
                   help="container runtimes' state directories, as netmon serve's "
                        "(env NETMON_RUNTIME_ROOTS)")
    p.add_argument("--kind", default="connect",
                   help="connect (default), udp_send, accept (TCP connections a listener "
                        "here completed: SOURCE is the client) or all (udp_send needs the "
                        "cgroup hooks)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=count, metavar="N", help="stop after N events")
    p.add_argument("--backend", type=backend, default="syscall",
                   help="syscall (default: the return code of every family), cgroup or "
                        "auto; with the cgroup hooks unix and UDP connects show 'unknown'")
    p.set_defaults(finish=finish, run=run)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`netmon trace ARGV`, as the netmon command runs it."""
    return run_command(configure(Parser(prog=PROG, allow_abbrev=False, **PARSER)),
                       sys.argv[1:] if argv is None else argv, PROG, os.environ)


def finish(args: argparse.Namespace, environ: Mapping[str, str]) -> argparse.Namespace:
    """The filters, checked here: a bad one fails before anything is loaded."""
    filters = {k: getattr(args, k) for k in FILTER_NAMES if getattr(args, k) is not None}
    try:
        args.where = compile_filter(**filters)
        if args.runtime_roots is None:
            args.runtime_roots = runtime_roots(environ.get("NETMON_RUNTIME_ROOTS", ""))
    except FilterError as e:
        raise UsageError(str(e)) from None
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"environment variable NETMON_RUNTIME_ROOTS: {e}") from None
    return args


def latency(us: Optional[int]) -> str:
    """A handshake's duration, short: 52us, 12.3ms, 3.00s; - if none."""
    if us is None:
        return "-"
    return f"{us}us" if us < 1000 else f"{us / 1000:.1f}ms" if us < 1_000_000 else \
        f"{us / 1e6:.2f}s"


def _source(ev: Event) -> str:
    if ev.source_port is None:
        return "-"
    ip = ev.source_ip or "*"
    return f"[{ip}]:{ev.source_port}" if ":" in ip else f"{ip}:{ev.source_port}"


def _destination(ev: Event, numeric: bool) -> str:
    """The name the process resolved in place of the IP, unless numeric."""
    if ev.destination_name and not numeric:
        return f"{ev.destination_name}:{ev.port}"
    return ev.destination or "-"


def line(ev: Event, numeric: bool = False) -> str:
    """What happened to the attempt: ok, the failure's errno name (whichever of connect()
    and the handshake gave it), pending (no outcome within the hold) or unknown."""
    if ev.kind == "udp_send":
        result = f"sent {ev.packets}"
    elif ev.kind == "accept":
        result = "accepted"
    elif ev.result == "error":
        result = ev.error or "error"
    else:
        result = ev.result
    return LINE.format(ev.timestamp.strftime("%H:%M:%S.%f"),
                       "-" if ev.pid is None else ev.pid, visible(ev.command or "-"),
                       FAMILIES.get(ev.family, str(ev.family)), _source(ev),
                       visible(_destination(ev, numeric)), ev.protocol or "-",
                       latency(ev.latency_us), result,
                       visible(workload(ev)))


def workload(ev: Event) -> str:
    """Who, in a word: namespace/pod/container, a container, else the unit or cgroup."""
    container = ev.container_name or (ev.container_id or "")[:12]
    if ev.pod_name or ev.pod_uid:
        return f"{ev.pod_namespace or '-'}/{ev.pod_name or ev.pod_uid}/{container or '-'}"
    if container:
        return f"{ev.container_runtime or 'container'}:{container}"
    return ev.unit or ev.cgroup or "-"


def _interrupt(*_):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    monitor = _start(args)
    shown = 0
    try:
        if not args.json:
            print(HEADER, flush=True)
        # from the first record: the store began empty at attach, before "watching"
        # was printed, so a connect made right after that line is never skipped
        for ev in monitor.follow(after_seq=0, where=args.where):
            # a SIGTERM/Ctrl-C waits until the line is out and counted: the summary's
            # count is exactly the lines printed
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                print(json.dumps(ev.to_dict()) if args.json else line(ev, args.numeric),
                      flush=True)
                shown += 1
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            if shown == args.count:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `| head`: the reader is gone; drop what is still buffered
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        stats = monitor.stats()
        monitor.stop()
    lost = ", ".join(f"{n} {reason}" for reason, n in stats["dropped"].items() if n)
    holds = stats["follow_holds"]
    print(f"netmon trace: {shown} shown; the kernel saw {stats['captured']} events, dropped "
          f"{stats['dropped_total']}{f' ({lost})' if lost else ''}; {holds['held']} held "
          f"for their handshake, {holds['expired']} shown still pending after "
          f"{HOLD_SECONDS:g} s", file=sys.stderr)
    return 0


def _start(args: argparse.Namespace) -> Monitor:
    monitor = Monitor(capacity=CAPACITY, backend=args.backend,
                      udp_sends=args.kind in ("udp_send", "all"),
                      dns_names=not args.numeric or args.name is not None,
                      runtime_roots=args.runtime_roots)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        monitor.start()
    except MonitorError as e:  # the cause's line; the verifier log is not for a terminal
        raise Failure(str(e).splitlines()[0]) from None
    print(f"netmon trace: watching with the {monitor.backend} backend; Ctrl-C stops",
          file=sys.stderr, flush=True)
    return monitor
