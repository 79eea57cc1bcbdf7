"""The TCP listeners that existed before netmon attached, and who owns them.

The kernel side learns a listener's owner when listen() is called; a service that was
listening before netmon started (sshd started at boot) would otherwise show no process
on its accepts. Once, at start, this walks /proc: each process's socket fds, and the
LISTEN sockets of each network namespace in /proc/<pid>/net/tcp{,6}. No per-event work.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

TCP_LISTEN = "0A"  # the st column of /proc/net/tcp


class Listener(NamedTuple):
    net_ns: int
    port: int
    pid: int
    uid: int
    cgroup_id: int
    comm: bytes


def _listening(pid: str) -> Dict[int, int]:
    """{socket inode: local port} of the LISTEN sockets in pid's network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[3] == TCP_LISTEN:
                        out[int(cols[9])] = int(cols[1].rsplit(":", 1)[1], 16)
        except (OSError, ValueError):
            continue
    return out


def _cgroup_id(pid: str, root: Optional[str]) -> int:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::") and root:
                    return os.stat(root + line[3:].strip()).st_ino
    except OSError:
        pass
    return 0


def _socket_inodes(pid: str) -> Iterator[int]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or a kernel thread
        return
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            yield int(target[8:-1])


def existing_listeners(cgroup_root: Optional[str]) -> Iterator[Listener]:
    """One Listener per (network namespace, port) listening now: its owner is the
    lowest pid holding the socket (the parent of a pre-forked server)."""
    by_netns: Dict[int, Dict[int, int]] = {}
    seen: set = set()
    pids = sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)
    for pid in pids:
        try:
            st = os.stat(f"/proc/{pid}")
            net_ns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if net_ns not in by_netns:
            by_netns[net_ns] = _listening(pid)
        ports = by_netns[net_ns]
        if not ports:
            continue
        for inode in _socket_inodes(pid):
            port = ports.get(inode)
            key: Tuple[int, int] = (net_ns, port)
            if port is None or key in seen:
                continue
            seen.add(key)
            try:
                with open(f"/proc/{pid}/comm", "rb") as f:
                    comm = f.read().rstrip(b"\n")
            except OSError:
                continue
            yield Listener(net_ns, port, int(pid), st.st_uid, _cgroup_id(pid, cgroup_root), comm)
