"""Event: one connect() attempt, decoded from a store row."""
from __future__ import annotations

import datetime as _dt
import errno as _errno
import json as _json
import socket as _socket
import time
from typing import NamedTuple, Optional, Tuple

from ._core import (
    JSON_LIST,
    JSON_RFC3339,
    JSON_SERVICE,
    NETMON_BACKEND_CGROUP,
    NETMON_BACKEND_SYSCALL,
    NETMON_F_INPROGRESS,
    NETMON_F_NO_OWNER,
    NETMON_F_NO_RESULT,
    NETMON_F_TRUNCATED,
    NETMON_KIND_ACCEPT,
    NETMON_KIND_CONNECT,
    NETMON_KIND_UDP_SEND,
    NETMON_OUTCOME_ESTABLISHED,
    NETMON_OUTCOME_FAILED,
    NETMON_OUTCOME_PENDING,
    RESULTS,
)
from ._core import boot_ns as _boot_ns
from ._core import json_objects as _json_objects
from .names import shown

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
KINDS = {NETMON_KIND_CONNECT: "connect", NETMON_KIND_UDP_SEND: "udp_send",
         NETMON_KIND_ACCEPT: "accept"}
BACKENDS = {NETMON_BACKEND_SYSCALL: "syscall", NETMON_BACKEND_CGROUP: "cgroup"}
# why a handshake failed, by -ret (ECONNABORTED: the socket closed mid-handshake without
# an error, e.g. the caller gave up on it)
FAILURES = {111: "refused", 110: "timeout", 104: "reset", 113: "unreachable",
            101: "unreachable", 103: "aborted"}
EINPROGRESS = 115

SOCKET_TYPES = {1: "STREAM", 2: "DGRAM", 3: "RAW", 4: "RDM", 5: "SEQPACKET", 6: "DCCP",
                10: "PACKET"}
PROTOCOLS = {1: "ICMP", 2: "IGMP", 6: "TCP", 17: "UDP", 33: "DCCP", 41: "IPV6", 47: "GRE",
             58: "ICMPV6", 132: "SCTP", 136: "UDPLITE", 255: "RAW", 262: "MPTCP"}
PROTOCOL_NUMBERS = {v: k for k, v in PROTOCOLS.items()}
FAMILIES = {0: "AF_UNSPEC", 1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK",
            17: "AF_PACKET", 40: "AF_VSOCK", 44: "AF_XDP"}
# a name for well-known destination ports; a hint for humans, never used to decide protocol
SERVICES = {20: "FTP-DATA", 21: "FTP", 22: "SSH", 23: "TELNET", 25: "SMTP", 53: "DNS",
            67: "DHCP", 68: "DHCP", 80: "HTTP", 110: "POP3", 123: "NTP", 143: "IMAP",
            161: "SNMP", 389: "LDAP", 443: "HTTPS", 465: "SMTPS", 514: "SYSLOG",
            587: "SUBMISSION", 636: "LDAPS", 853: "DNS-over-TLS", 993: "IMAPS", 995: "POP3S",
            1433: "MSSQL", 1521: "ORACLE", 2049: "NFS", 2181: "ZOOKEEPER", 2379: "ETCD",
            3306: "MYSQL", 3389: "RDP", 5432: "POSTGRESQL", 5672: "AMQP", 6379: "REDIS",
            6443: "KUBERNETES-API", 8080: "HTTP-ALT", 8443: "HTTPS-ALT", 9092: "KAFKA",
            9200: "ELASTICSEARCH", 11211: "MEMCACHED", 27017: "MONGODB"}
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


_offset = [0, -1 << 62]  # [offset_ns, boot_ns when measured]
OFFSET_REFRESH_NS = 1_000_000_000


def wall_offset_ns() -> int:
    """CLOCK_REALTIME - the kernel's boot clock: add to a record's boot-time stamp for
    UTC. The kernel's clock, not this process's CLOCK_BOOTTIME, which a time namespace
    offsets (see _core.boot_ns). Measured between two boot-clock reads (so it does not
    jitter by the read's own cost) and refreshed every second, so an NTP step is followed
    within a second."""
    b1 = _boot_ns()
    if b1 - _offset[1] < OFFSET_REFRESH_NS:
        return _offset[0]
    real = time.clock_gettime_ns(time.CLOCK_REALTIME)
    b2 = _boot_ns()
    _offset[:] = [real - (b1 + b2) // 2, b1]
    return _offset[0]


def to_datetime(ns: int) -> _dt.datetime:
    """ns since the epoch -> aware UTC datetime, microsecond resolution (floored)."""
    return _EPOCH + _dt.timedelta(microseconds=ns // 1000)


def rfc3339(ts: _dt.datetime) -> str:
    if ts.year >= 1000:  # isoformat is the faster, and it runs for every event served
        return ts.isoformat(timespec="microseconds")[:26] + "Z"
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _unix_path(addr: bytes, flags: int):
    """(text, truncated) for a sun_path prefix: '@name' for abstract names."""
    if addr[:1] == b"\0":
        return "@" + shown(addr[1:]), bool(flags & NETMON_F_TRUNCATED)
    path, nul, _ = addr.partition(b"\0")
    return shown(path), bool(flags & NETMON_F_TRUNCATED) and not nul


def _outcome(code: int, ret: int, flags: int, protocol: Optional[str]) -> Optional[str]:
    if code == NETMON_OUTCOME_ESTABLISHED:
        return "established"
    if code == NETMON_OUTCOME_PENDING:
        return "pending"
    if code == NETMON_OUTCOME_FAILED:
        return FAILURES.get(-ret, "failed")
    return "unknown" if flags & NETMON_F_NO_RESULT else None


def _return_code(ret: int, flags: int) -> Optional[int]:
    """What connect() returned: ret, unless the store marked it EINPROGRESS (ret then
    follows the handshake) or the hook could not know it."""
    if flags & NETMON_F_INPROGRESS:
        return -EINPROGRESS
    return None if flags & NETMON_F_NO_RESULT else ret


def _source(family: int, port: int, addr: bytes):
    """(ip, port) of the source, (None, None) where the kernel had not chosen it."""
    if not port:
        return None, None
    if family == AF_INET:
        raw = addr[:4]
    elif family == AF_INET6:
        raw = addr
    else:
        return None, None
    if not any(raw):  # a wildcard is not an address the packets carried
        return None, port
    return _socket.inet_ntop(family, raw), port


class Event(NamedTuple):
    """One connect() attempt (or, kind "udp_send", unconnected UDP datagrams to one
    destination within a second; kind "accept", a TCP connection a listener on this host
    completed: destination is then the local service and source the remote client, pid
    and command the process that called listen()), immutable."""
    seq: int
    timestamp: _dt.datetime  # UTC, microseconds
    pid: Optional[int]  # None: an accept whose listener's owner is unknown
    tid: Optional[int]
    uid: Optional[int]
    cgroup_id: Optional[int]
    command: Optional[str]
    family: int  # AF_* number as the caller gave it
    destination: Optional[str]  # "1.2.3.4:80", "[::1]:443", "/path", "@abstract"; None if none
    ip: Optional[str]
    port: Optional[int]
    socket_type: Optional[str]  # "STREAM", "DGRAM", ...; None when the fd was not a socket
    protocol: Optional[str]  # "TCP", "UDP", "UNIX", ...; from the kernel socket
    return_code: Optional[int]  # what connect() returned: 0 or -errno; None where the
    #                             backend cannot know it
    error: Optional[str]  # the failure's errno name (EINPROGRESS while pending); None if none
    truncated: bool  # a unix path longer than the record holds was cut
    ts_ns: int  # CLOCK_BOOTTIME ns, as recorded by the kernel
    kind: str  # "connect" or "udp_send"
    backend: str  # "syscall" or "cgroup"
    net_ns: Optional[int]  # network namespace inode
    outcome: Optional[str]  # TCP: established/refused/timeout/reset/unreachable/failed/pending
    latency_us: Optional[int]  # TCP handshake time, once known
    packets: Optional[int]  # udp_send: datagrams in the second
    result: str  # what happened to the attempt: ok, error, pending or unknown (not in JSON)
    source_ip: Optional[str] = None  # the local address of a connect, the client's of an accept
    source_port: Optional[int] = None  # None where unknown (never 0)
    # the name the process asked DNS for, when netmon saw the answer that gave this IP in
    # this network namespace (Monitor(dns_names=True)); the CNAMEs it went through
    destination_name: Optional[str] = None
    destination_cname_chain: Optional[Tuple[str, ...]] = None
    # who: names for cgroup_id and pid, resolved off the capture path (see identity.py)
    cgroup: Optional[str] = None  # cgroup v2 path from the cgroup2 root
    unit: Optional[str] = None  # systemd unit
    container_runtime: Optional[str] = None  # docker, containerd, cri-o, podman
    container_id: Optional[str] = None
    pod_uid: Optional[str] = None
    pod_qos: Optional[str] = None  # guaranteed, burstable, besteffort
    container_name: Optional[str] = None
    pod_name: Optional[str] = None
    pod_namespace: Optional[str] = None
    ppid: Optional[int] = None
    exe: Optional[str] = None  # the executable's path

    @classmethod
    def from_row(cls, row, offset_ns: int, names: tuple = ()) -> "Event":
        """A store row -> Event; `names`: its naming fields in NAME_FIELDS order
        (Identity.fields_of), else those are None."""
        (seq, ts_ns, cgroup_id, pid, tid, uid, ret, family, port, sock_type, proto, flags,
         comm, addr, kind, backend, outcome, net_ns, latency_us, packets, result, src_port,
         src_addr) = row
        result = RESULTS[result]
        ip = dest = None
        out_port = None
        truncated = False
        udp = kind == NETMON_KIND_UDP_SEND
        if family == AF_INET and len(addr) == 4:
            ip = _socket.inet_ntop(_socket.AF_INET, addr)
            dest, out_port = f"{ip}:{port}", port
        elif family == AF_INET6 and len(addr) == 16:
            ip = _socket.inet_ntop(_socket.AF_INET6, addr)
            dest, out_port = f"[{ip}]:{port}", port
        elif family == AF_UNIX:
            dest, truncated = _unix_path(addr, flags)
        if family == AF_UNIX and sock_type:
            protocol = "UNIX"
        elif sock_type:
            protocol = PROTOCOLS.get(proto, str(proto)) if proto else None
        else:
            protocol = None
        source_ip, source_port = _source(family, src_port, src_addr)
        owned = not flags & NETMON_F_NO_OWNER
        # positionally, in field order, and the names appended: keyword arguments cost a
        # third of the time here, which runs for every event built
        return tuple.__new__(cls, (
            seq, to_datetime(ts_ns + offset_ns),  # seq, timestamp
            pid if owned else None, tid if owned else None, uid if owned else None,
            cgroup_id if owned else None, shown(comm) if owned else None,  # .., command
            family, dest, ip, out_port,  # family, destination, ip, port
            SOCKET_TYPES.get(sock_type, str(sock_type)) if sock_type else None,  # socket_type
            protocol,
            _return_code(ret, flags),  # return_code
            (_errno.errorcode.get(-ret, f"E{-ret}") if ret < 0 and result != "ok"  # error
             and not flags & NETMON_F_NO_RESULT else None),
            truncated, ts_ns, KINDS.get(kind, str(kind)),  # truncated, ts_ns, kind
            BACKENDS.get(backend, str(backend)), net_ns or None,  # backend, net_ns
            None if udp else _outcome(outcome, ret, flags, protocol),  # outcome
            latency_us or None, packets if udp else None,  # latency_us, packets
            result, source_ip, source_port,
            None, None,  # destination_name, destination_cname_chain: Monitor fills them
        ) + (names if names and owned else _NO_NAMES))

    @property
    def service(self) -> Optional[str]:
        return SERVICES.get(self.port) if self.port is not None else None

    def to_dict(self) -> dict:
        """The JSON form served by the API (field names kept from the predecessor)."""
        d = {k: self[c] for k, c, _ in _JSON}
        for k, c, how in _JSON_DERIVED:
            d[k] = _DERIVE[how](self[c])
        return d


# who: the fields naming the workload and the process, last in Event
NAME_FIELDS = Event._fields[Event._fields.index("cgroup"):]

# The JSON form, key by key: (key, the Event field's index, how it is shown: 0 as it is,
# else derived from that field as _DERIVE says). _core.json_objects reads the same table.
_DERIVE = {JSON_SERVICE: SERVICES.get, JSON_LIST: lambda v: list(v) if v else None,
           JSON_RFC3339: rfc3339}
_JSON = tuple((key, Event._fields.index(field), how) for key, field, how in (
    ("seq", "seq", 0), ("pid", "pid", 0), ("tid", "tid", 0), ("uid", "uid", 0),
    ("command", "command", 0), ("destination", "destination", 0),
    ("destination_ip", "ip", 0), ("destination_port", "port", 0),
    ("source_ip", "source_ip", 0), ("source_port", "source_port", 0),
    ("address_family", "family", 0), ("protocol", "protocol", 0),
    ("socket_type", "socket_type", 0), ("service", "port", JSON_SERVICE),
    ("return_code", "return_code", 0), ("error", "error", 0), ("cgroup_id", "cgroup_id", 0),
    ("truncated", "truncated", 0), ("kind", "kind", 0), ("backend", "backend", 0),
    ("net_ns", "net_ns", 0), ("outcome", "outcome", 0), ("latency_us", "latency_us", 0),
    ("packets", "packets", 0), ("destination_name", "destination_name", 0),
    ("destination_cname_chain", "destination_cname_chain", JSON_LIST),
    ("timestamp", "timestamp", JSON_RFC3339), ("wall_time", "timestamp", JSON_RFC3339),
    *((f, f, 0) for f in NAME_FIELDS)))
_JSON_DERIVED = tuple(k for k in _JSON if k[2])
_JSON_KEYS = tuple(("{" if i == 0 else ", ") + _json.dumps(k) + ": "
                   for i, (k, _, _) in enumerate(_JSON)) + ("}",)
_JSON_COLUMNS = tuple(c for _, c, _ in _JSON)
_JSON_HOW = tuple(h for _, _, h in _JSON)


def events_json(events) -> str:
    """json.dumps([e.to_dict() for e in events]), the same text, ~5x as fast."""
    return _json_objects(events, _JSON_KEYS, _JSON_COLUMNS, _JSON_HOW, SERVICES, rfc3339)


_NO_NAMES = (None,) * len(NAME_FIELDS)
