"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (Type=notify units), and
the watchdog interval systemd asks for (WatchdogSec= sets $WATCHDOG_USEC)."""
from __future__ import annotations

import os
import socket
from typing import Optional


def notify(state: str) -> bool:
    """Send e.g. "READY=1" or "STOPPING=1"; False when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), path)
    return True


def _ancestors() -> set:
    """This process's pid and its ancestors' (the single binary's launcher is the service's
    main process; netmon runs below it)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def watchdog_interval() -> Optional[float]:
    """Seconds between the WATCHDOG=1 pings systemd expects (half of WatchdogSec=, as
    sd_watchdog_enabled advises), or None when no watchdog is set for this process (or
    for the launcher it runs under)."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and not (pid.isdigit() and int(pid) in _ancestors())):
        return None
    try:
        return int(usec) / 2e6 if int(usec) > 0 else None
    except ValueError:
        return None
