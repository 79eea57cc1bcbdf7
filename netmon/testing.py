"""Synthetic records for tests and benchmarks: raw netmon_event bytes, laid out exactly
as bpf/netmon.h declares them, to push through Monitor.inject() / Store.push_raw() (the
same C path the kernel callback takes). No root, no BPF."""
from __future__ import annotations

import socket
import struct
from typing import Optional

from . import _core
from .monitor import Monitor

# bpf/netmon.h, struct netmon_event (the extension checks RECORD_SIZE)
RECORD = struct.Struct("<QQQIIIiIIIHHHBBBBBB16s48s")
assert RECORD.size == _core.RECORD_SIZE


def record(*, pid: int = 1000, tid: Optional[int] = None, uid: int = 0, comm: str = "test",
           ip: Optional[str] = "127.0.0.1", port: int = 80, path: Optional[str] = None,
           family: Optional[int] = None, sock_type: int = 1, protocol: Optional[int] = None,
           ret: int = 0, cgroup_id: int = 1, ts_ns: Optional[int] = None, age: float = 0.0,
           flags: int = 0, kind: int = 1, backend: int = 1, outcome: int = 0,
           sock_id: int = 0, net_ns: int = 4026531840, latency_us: int = 0,
           packets: int = 0) -> bytes:
    """One raw record. Defaults: a successful TCP connect to 127.0.0.1:80 just now.
    path= makes it AF_UNIX ('@name' for abstract); ip with ':' makes it AF_INET6;
    age= is seconds before now (ignored when ts_ns is given). kind 3 with sock_id makes a
    TCP outcome record (outcome 2 established, 3 failed with ret)."""
    if ts_ns is None:
        ts_ns = _core.boot_ns() - int(age * 1e9)
    if path is not None:
        fam = socket.AF_UNIX
        raw = b"\0" + path[1:].encode() if path.startswith("@") else path.encode()
        addr, port, proto = raw[:_core.ADDR_LEN], 0, 0
        if len(raw) > _core.ADDR_LEN:
            flags |= 0x1
    elif ip is not None and ":" in ip:
        fam, addr, proto = socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip), 6
    elif ip is not None:
        fam, addr, proto = socket.AF_INET, socket.inet_aton(ip), 6
    else:
        fam, addr, proto = 0, b"", 0
    if sock_type == 2 and proto == 6:
        proto = 17
    return RECORD.pack(ts_ns, cgroup_id, sock_id, pid, pid if tid is None else tid, uid, ret,
                       net_ns, latency_us, packets, fam if family is None else family, port,
                       proto if protocol is None else protocol, sock_type, flags, kind,
                       backend, outcome, len(addr), comm.encode()[:15], addr)


def synthetic_monitor(capacity: int = 4096) -> Monitor:
    """A Monitor with a store and no kernel side: feed it with inject(record(...))."""
    return Monitor(capacity=capacity)
