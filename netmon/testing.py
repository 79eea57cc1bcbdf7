"""Synthetic records for tests and benchmarks: raw netmon_event bytes, laid out exactly
as bpf/netmon.h declares them, to push through Monitor.inject() / Store.push_raw() (the
same C path the kernel callback takes). No root, no BPF."""
from __future__ import annotations

import socket
import struct
from typing import Optional

from . import _core
from ._core import (
    NETMON_BACKEND_SYSCALL,
    NETMON_F_TRUNCATED,
    NETMON_KIND_CONNECT,
    NETMON_OUTCOME_NONE,
)
from .monitor import Monitor


def _layout():
    """struct netmon_event as the extension was compiled with it: a Struct packing its
    fields in offset order (padding between them zero), and the field names."""
    fmt = "<"
    for offset, code in _core.RECORD_FIELDS.values():
        fmt += "x" * (offset - struct.calcsize(fmt)) + code
    fmt += "x" * (_core.RECORD_SIZE - struct.calcsize(fmt))
    return struct.Struct(fmt), tuple(_core.RECORD_FIELDS)


RECORD, FIELDS = _layout()
assert RECORD.size == _core.RECORD_SIZE
# Synthetic monitors' clock runs this far ahead of the kernel's boot clock, so a record
# of any age a test gives fits on it on a machine that booted a minute ago (a boot-clock
# stamp cannot be negative), and every window and `since` a test asks for reaches back
# over records as it would on a long-running host.
CLOCK_SHIFT_NS = 30 * 86400 * 10**9


def now_ns() -> int:
    """Now on synthetic monitors' clock: what record(age=) counts back from."""
    return _core.boot_ns() + CLOCK_SHIFT_NS


def record(*, pid: int = 1000, tid: Optional[int] = None, uid: int = 0, comm: str = "test",
           ip: Optional[str] = "127.0.0.1", port: int = 80, path: Optional[str] = None,
           family: Optional[int] = None, sock_type: int = socket.SOCK_STREAM,
           protocol: Optional[int] = None, ret: int = 0, cgroup_id: int = 1,
           ts_ns: Optional[int] = None, age: float = 0.0, flags: int = 0,
           kind: int = NETMON_KIND_CONNECT, backend: int = NETMON_BACKEND_SYSCALL,
           outcome: int = NETMON_OUTCOME_NONE, sock_id: int = 0, net_ns: int = 4026531840,
           latency_us: int = 0, packets: int = 0, src_ip: Optional[str] = None,
           src_port: int = 0) -> bytes:
    """One raw record. Defaults: a successful TCP connect to 127.0.0.1:80 just now.
    path= makes it AF_UNIX ('@name' for abstract); ip with ':' makes it AF_INET6;
    age= is seconds before now_ns() (ignored when ts_ns is given, on that same clock).
    kind NETMON_KIND_TCP_OUTCOME with sock_id makes a TCP outcome record (outcome
    NETMON_OUTCOME_ESTABLISHED, or NETMON_OUTCOME_FAILED with ret). src_ip/src_port: the
    source (for kind NETMON_KIND_ACCEPT the remote client; ip/port then the local service)."""
    if ts_ns is None:
        ts_ns = now_ns() - int(age * 1e9)
    if path is not None:
        fam = socket.AF_UNIX
        raw = b"\0" + path[1:].encode() if path.startswith("@") else path.encode()
        addr, port, proto = raw[:_core.ADDR_LEN], 0, 0
        if len(raw) > _core.ADDR_LEN:
            flags |= NETMON_F_TRUNCATED
    elif ip is not None and ":" in ip:
        fam, addr = socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip)
        proto = socket.IPPROTO_TCP
    elif ip is not None:
        fam, addr, proto = socket.AF_INET, socket.inet_aton(ip), socket.IPPROTO_TCP
    else:
        fam, addr, proto = 0, b"", 0
    if sock_type == socket.SOCK_DGRAM and proto == socket.IPPROTO_TCP:
        proto = socket.IPPROTO_UDP
    src = b""
    if src_ip is not None:
        src = socket.inet_pton(socket.AF_INET6 if ":" in src_ip else socket.AF_INET, src_ip)
    fields = dict(
        ts_ns=ts_ns, cgroup_id=cgroup_id, sock_id=sock_id, pid=pid,
        tid=pid if tid is None else tid, uid=uid, ret=ret, net_ns=net_ns,
        latency_us=latency_us, packets=packets, family=fam if family is None else family,
        port=port, protocol=proto if protocol is None else protocol, sock_type=sock_type,
        flags=flags, kind=kind, backend=backend, outcome=outcome, addr_len=len(addr),
        comm=comm.encode()[:_core.COMM_LEN - 1], addr=addr, src_port=src_port, src_addr=src)
    raw = RECORD.pack(*(fields[name] for name in FIELDS))
    if fields["family"] not in (socket.AF_INET, socket.AF_INET6):
        return raw  # the overlays' bytes are a unix path's
    out = bytearray(raw)
    for name, (offset, code) in _core.RECORD_OVERLAYS.items():
        struct.pack_into("<" + code, out, offset, fields[name])
    return bytes(out)


def synthetic_monitor(capacity: int = 4096) -> Monitor:
    """A Monitor with a store and no kernel side, on the synthetic clock (now_ns()): feed
    it with inject(record(...)). Its events' timestamps and its windows are wall-clock
    right all the same."""
    m = Monitor(capacity=capacity)
    m._clock_shift_ns = CLOCK_SHIFT_NS
    return m
