"""One place that turns query filters (names, addresses, times) into what the C store
matches on, with a ValueError naming the bad parameter. Shared by Monitor, the API and
`netmon trace`: compile_filter() checks and compiles them once into a Filter, which
Monitor's queries hand straight to the store."""
from __future__ import annotations

import datetime as _dt
import errno as _errno
import ipaddress
import re
from typing import Optional, Union

from . import _core
from .event import AF_INET, AF_INET6, AF_UNIX, KINDS, PROTOCOL_NUMBERS, wall_offset_ns
from .names import name_bytes

# the filters every query takes, by the name the API, its OpenAPI description and
# `netmon trace` give them (compile_filter's keywords, plus since / until / after_seq)
FILTER_NAMES = ("pid", "command", "family", "protocol", "port", "dest", "result", "kind",
                "src", "sport", "name", "unit", "container", "pod", "namespace", "cgroup",
                "ppid", "exe")
# the filters naming a workload or a process: the Monitor turns them into the cgroup ids
# and process ranges they cover when a query runs (see Monitor.names_to_ids)
NAME_FILTERS = ("unit", "container", "pod", "namespace", "cgroup", "ppid", "exe")
FAMILY_NAMES = {"inet": AF_INET, "inet6": AF_INET6, "unix": AF_UNIX}
KIND_NUMBERS = {v: k for k, v in KINDS.items()}
Time = Union[None, _dt.datetime, _dt.timedelta]
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class FilterError(ValueError):
    """A bad filter or parameter; str() is "param: message", or the message alone when it
    is a whole sentence already (whole=True)."""

    def __init__(self, param: str, message: str, *, whole: bool = False):
        super().__init__(message if whole else f"{param}: {message}")
        self.param = param


def int_in(param: str, value, lo: int, hi: int, message: Optional[str] = None) -> int:
    """value as an int in [lo, hi], else a FilterError: "param: must be an integer between
    lo and hi", or `message` as the whole text. Booleans are not integers."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        if message is not None:
            raise FilterError(param, message, whole=True)
        raise FilterError(param, f"must be an integer between {lo} and {hi}")
    return value


# RFC 3339's date-time, parsed the same on every Python (fromisoformat accepts more from
# 3.11 on: week dates, no seconds, basic format), so an answer never depends on the version
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
                      r"(?:([Zz])|([+-])(\d\d):(\d\d))?")


def parse_time(param: str, text: str) -> _dt.datetime | _dt.timedelta:
    """'300s' / '5m' / '2h' (that long ago) or an RFC 3339 timestamp with a zone
    (fractions beyond microseconds are cut)."""
    m = re.fullmatch(r"(\d{1,9})([smh])", text)
    if m:
        return _dt.timedelta(seconds=int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)])
    m = _RFC3339.fullmatch(text)
    try:
        if not m:
            raise ValueError(text)
        y, mo, d, h, mi, sec = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
        micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
        zone = None
        if m.group(8):
            zone = _dt.timezone.utc
        elif m.group(9):
            if int(m.group(11)) > 59:
                raise ValueError(text)
            offset = _dt.timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
            zone = _dt.timezone(-offset if m.group(9) == "-" else offset)
        t = _dt.datetime(y, mo, d, h, mi, sec, micro, tzinfo=zone)
    except ValueError:
        raise FilterError(param, "must be RFC 3339 (2026-11-27T14:30:00Z) or an age like "
                                 "300s") from None
    if t.tzinfo is None:
        raise FilterError(param, "RFC 3339 timestamp needs a zone (Z or +hh:mm)")
    return t


def boot_ns(param: str, t: Time) -> Optional[int]:
    """A wall-clock instant or an age -> the kernel's boot clock (ns), None for None. Not
    clamped: a bound before boot is negative (and past the clock's u64, larger), and
    the Monitor that runs the query clamps it on its own clock."""
    if t is None:
        return None
    if isinstance(t, _dt.timedelta):
        return _core.boot_ns() - t // _dt.timedelta(microseconds=1) * 1000
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            raise FilterError(param, "must be timezone-aware")
        return (t - _EPOCH) // _dt.timedelta(microseconds=1) * 1000 - wall_offset_ns()
    raise FilterError(param, "must be a datetime or a timedelta")


def _named(param: str, v, names: dict, hi: int) -> int:
    if isinstance(v, str):
        if v.lower() not in names:
            raise FilterError(param, f"must be one of {', '.join(sorted(names))}")
        return names[v.lower()]
    return int_in(param, v, 0, hi)


def _dest(v: str):
    if not isinstance(v, str) or not v:
        raise FilterError("dest", "must be an IP, a CIDR or a unix path prefix")
    if v[0] in "/@":
        try:
            raw = b"\0" + name_bytes(v[1:]) if v[0] == "@" else name_bytes(v)
        except UnicodeEncodeError:  # a lone surrogate
            raise FilterError("dest", "a unix path prefix must be valid UTF-8") from None
        if len(raw) > _core.ADDR_LEN:
            raise FilterError("dest", f"unix path prefix longer than {_core.ADDR_LEN} bytes")
        return AF_UNIX, raw, len(raw)
    try:
        net = ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise FilterError("dest", "must be an IP, a CIDR like 10.0.0.0/8, or a unix path "
                                  "prefix starting with / or @") from None
    return (AF_INET if net.version == 4 else AF_INET6), net.network_address.packed, net.prefixlen


# what happened to an attempt (the same on both backends): connected, failed, the
# handshake has no outcome yet, the backend cannot tell
RESULT_NAMES = ("ok", "error", "pending", "unknown")


def _src(v: str):
    """An IP or a CIDR: the source address (a connect's local one, an accept's client)."""
    try:
        net = ipaddress.ip_network(v, strict=False) if isinstance(v, str) else None
    except ValueError:
        net = None
    if net is None:
        raise FilterError("src", "must be an IP or a CIDR like 10.0.0.0/8")
    return (AF_INET if net.version == 4 else AF_INET6), net.network_address.packed, net.prefixlen


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _name(v) -> str:
    """A destination name pattern: a host name, or *.suffix for any name below suffix;
    case and a final dot do not matter."""
    msg = "must be a host name like api.example.com, or *.example.com for names below it"
    if not isinstance(v, str):
        raise FilterError("name", msg)
    text = v.rstrip(".").lower()
    labels = text[2:].split(".") if text.startswith("*.") else text.split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise FilterError("name", msg)
    return text


def _result(v):
    """ok / error / pending / unknown, or an errno name (the failure's errno, whether
    connect() or the handshake gave it; EINPROGRESS: pending non-blocking connects)."""
    if v in RESULT_NAMES:
        return v
    if isinstance(v, str):
        code = getattr(_errno, v.upper(), None) if v.upper().startswith("E") else None
        if not isinstance(code, int):
            raise FilterError("result", "must be ok, error, pending, unknown, or an errno "
                                        "name like ECONNREFUSED")
        return -code
    return int_in("result", v, -4095, 0)


class Filter:
    """Filters checked and compiled once: `keywords` as they were given, `store` the
    keyword arguments of the C store's queries. Monitor's queries take one as where=."""

    __slots__ = ("keywords", "store", "names")

    def __init__(self, keywords: dict, store: dict, names: Optional[dict] = None):
        self.keywords, self.store = keywords, store
        self.names = names or {}  # NAME_FILTERS given, checked, not yet turned into ids

    def after(self, seq: int) -> "Filter":
        """The same filter, matching only events after `seq`."""
        return Filter({**self.keywords, "after_seq": seq},
                      {**self.store, "after_seq": int_in("after", seq, 0, 2**63 - 1)},
                      self.names)


def compile_filter(**keywords) -> Filter:
    """Filters (the keywords of _store_args, and NAME_FILTERS) -> a Filter; a FilterError
    names a bad one."""
    names = {k: _name_filter(k, keywords[k]) for k in NAME_FILTERS
             if keywords.get(k) is not None}
    rest = {k: v for k, v in keywords.items() if k not in NAME_FILTERS}
    return Filter(keywords, _store_args(**rest), names)


def _name_filter(param: str, v):
    """A workload or process filter, checked: ppid a pid, cgroup a path from the cgroup2
    root, the others non-empty names."""
    if param == "ppid":
        return int_in("ppid", v, 0, 2**32 - 1)
    if not isinstance(v, str) or not v or len(v) > 4096 or "\0" in v:
        raise FilterError(param, "must be a non-empty string")
    if param == "cgroup":
        if not v.startswith("/"):
            raise FilterError("cgroup", "must be a path from the cgroup2 root, like "
                                        "/system.slice")
        return "/" + "/".join(p for p in v.split("/") if p)
    return v


def _store_args(*, pid=None, command=None, kind="connect", family=None, protocol=None,
                port=None, dest=None, result=None, src=None, sport=None, name=None,
                since: Time = None, until: Time = None, after_seq: int = 0) -> dict:
    """Filters -> the keyword arguments of _core.Store queries. kind defaults to connect
    attempts; pass kind="all" (or None) for every kind. src/sport: the source address
    (IP or CIDR) and port, which only events with a known source match."""
    q = {"since_ns": boot_ns("since", since), "until_ns": boot_ns("until", until),
         "after_seq": int_in("after", after_seq, 0, 2**63 - 1)}
    if pid is not None:
        q["pid"] = int_in("pid", pid, 0, 2**32 - 1)
    if command is not None:
        try:
            raw = name_bytes(command) if isinstance(command, str) else b""
        except UnicodeEncodeError:  # a lone surrogate
            raw = b""
        if not raw or len(raw) >= _core.COMM_LEN:
            raise FilterError("command", "must be a non-empty string of at most "
                                         f"{_core.COMM_LEN - 1} bytes")
        q["comm"] = raw  # as answers show names: \xNN for a byte that is not UTF-8
    if kind is not None and kind != "all":
        q["kind"] = _named("kind", kind, KIND_NUMBERS, 255)
    if family is not None:
        q["family"] = _named("family", family, FAMILY_NAMES, 65535)
    if protocol is not None:
        q["protocol"] = _named("protocol", protocol,
                               {k.lower(): v for k, v in PROTOCOL_NUMBERS.items()}, 65535)
    if port is not None:
        q["port"] = int_in("port", port, 0, 65535)
    if dest is not None:
        q["dest"] = _dest(dest)
    if result is not None:
        q["result"] = _result(result)
    if src is not None:
        q["src"] = _src(src)
    if sport is not None:
        q["sport"] = int_in("sport", sport, 1, 65535)
    if name is not None:  # Monitor turns it into (net_ns, IP, time) windows per query
        q["name"] = _name(name)
    return q
