"""Destination names: which host name a connect was for, learned from the DNS answers the
host's processes receive.

The kernel side (netmon_dns_ingress in bpf/netmon.bpf.c) passes the payload of every UDP
datagram and TCP segment from source port 53 that a socket receives. Here, per DNS answer
(never per connect): a small strict parser (`parse_response`) and `NameCache`, which keeps
for each (network namespace, IP) the answers that named it, each valid from the moment the
answer arrived for max(TTL, floor). An event's name is the most recent answer in its
namespace for its destination IP whose validity covers the event's time; a `name=` filter
becomes the set of such (namespace, IP, time window) the C store matches on.
"""
from __future__ import annotations

import socket
import struct
import threading
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Tuple

from . import _core

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
IPPROTO_TCP = 6
TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
CLASS_IN = 1
MAX_NAME = 255  # wire bytes of a name (RFC 1035 2.3.4)
MAX_CHAIN = 16  # CNAMEs followed from the question's name
DEFAULT_CAPACITY = 65536  # (net_ns, IP) keys
DEFAULT_FLOOR_SECONDS = 300  # an answer names its addresses for at least this long
HISTORY = 8  # answers kept per (net_ns, IP): earlier ones are dropped, counted
MAX_TCP_STREAMS = 256  # DNS-over-TCP connections followed at once (LRU; 64 KiB each at most)
TCP_STREAM_IDLE_NS = 30 * 1_000_000_000  # a stream silent this long is forgotten
_HEADER = struct.Struct("=QIIHHIQ")  # struct netmon_dns (bpf/netmon.h)
_WINDOW = struct.Struct("=IHH16sQQII")  # struct nm_name_window (ext/store.h)
assert _HEADER.size == _core.DNS_HEADER_SIZE and _WINDOW.size == _core.NAME_WINDOW_SIZE
_V4MAPPED = b"\0" * 10 + b"\xff\xff"


class DNSError(ValueError):
    """A payload that is not a well-formed DNS response."""


def _name(msg: bytes, pos: int) -> Tuple[str, int]:
    """The name at pos -> (lower-case text without the final dot, offset after it).
    Compression pointers must point strictly backwards of the label that holds them, so
    every jump makes progress towards the start: no loop, no stall, at most len(msg)
    jumps; the name's wire length is bounded by MAX_NAME."""
    labels: List[str] = []
    end = None  # where the name ends in the record (after its first pointer)
    limit = pos  # a pointer must point below this
    total = 1
    while True:
        if pos >= len(msg):
            raise DNSError("name runs past the end")
        n = msg[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                raise DNSError("compression pointer runs past the end")
            ptr = (n & 0x3F) << 8 | msg[pos + 1]
            if ptr >= limit:
                raise DNSError("compression pointer does not point backwards")
            if end is None:
                end = pos + 2
            limit = pos = ptr
            continue
        if n & 0xC0:
            raise DNSError("unknown label type")
        if n == 0:
            break
        total += n + 1
        if total > MAX_NAME:
            raise DNSError("name longer than 255 bytes")
        label = msg[pos + 1:pos + 1 + n]
        if len(label) != n:
            raise DNSError("label runs past the end")
        labels.append(_label_text(label))
        pos += 1 + n
    return ".".join(labels), (pos + 1 if end is None else end)


def _label_text(label: bytes) -> str:
    """A label as text: lower-case ASCII; '.', '\\' and bytes outside 0x21-0x7e escaped
    as \\DDD (RFC 1035's master-file form), so a name never splits wrongly."""
    if all(0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) for b in label):
        return label.decode("ascii").lower()
    return "".join(chr(b).lower() if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C)
                   else f"\\{b:03d}" for b in label)


class Answer(NamedTuple):
    name: str  # the name asked for
    chain: Tuple[str, ...]  # the CNAMEs that led from it to the addresses, in order
    family: int
    addr: bytes  # 4 or 16 bytes
    ttl: int  # seconds: the smallest TTL along the chain


def parse_response(msg: bytes) -> List[Answer]:
    """A DNS response -> the addresses it gives for the question's name, through CNAMEs.
    An error response, or one without A/AAAA for the name, gives []. Anything malformed
    (not a response, truncated, bad compression, counts the message cannot hold) raises
    DNSError. The authority and additional sections (EDNS's OPT record) are checked for
    shape, not read."""
    if len(msg) < 12:
        raise DNSError("shorter than a DNS header")
    _, flags, qd, an, ns, ar = struct.unpack_from("!6H", msg)
    if not flags & 0x8000:
        raise DNSError("a query, not a response")
    if flags >> 11 & 0xF:
        raise DNSError("opcode is not QUERY")
    if qd != 1:
        raise DNSError("not exactly one question")
    qname, pos = _name(msg, 12)
    if pos + 4 > len(msg):
        raise DNSError("question runs past the end")
    pos += 4
    if (an + ns + ar) * 11 > len(msg) - pos:  # each record is at least 11 bytes
        raise DNSError("more answers than the message can hold")
    if flags & 0xF:  # NXDOMAIN, SERVFAIL, ...: nothing named
        return []
    cnames: Dict[str, Tuple[str, int]] = {}
    addrs: List[Tuple[str, int, bytes, int]] = []
    for _ in range(an):
        owner, pos = _name(msg, pos)
        if pos + 10 > len(msg):
            raise DNSError("record header runs past the end")
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, pos)
        pos += 10
        if pos + rdlen > len(msg):
            raise DNSError("record data runs past the end")
        if ttl >> 31:  # RFC 2181 8: a TTL with the top bit set is 0
            ttl = 0
        if rclass == CLASS_IN:
            if rtype == TYPE_A and rdlen == 4:
                addrs.append((owner, AF_INET, msg[pos:pos + 4], ttl))
            elif rtype == TYPE_AAAA and rdlen == 16:
                addrs.append((owner, AF_INET6, msg[pos:pos + 16], ttl))
            elif rtype == TYPE_CNAME:
                target, after = _name(msg, pos)
                if after != pos + rdlen:
                    raise DNSError("CNAME data length does not match its name")
                cnames.setdefault(owner, (target, ttl))
            elif rtype in (TYPE_A, TYPE_AAAA):
                raise DNSError("address record of the wrong length")
        pos += rdlen
    for _ in range(ns + ar):  # authority, additional (EDNS's OPT): only checked for shape
        pos = _name(msg, pos)[1]
        if pos + 10 > len(msg):
            raise DNSError("record header runs past the end")
        pos += 10 + struct.unpack_from("!H", msg, pos + 8)[0]
        if pos > len(msg):
            raise DNSError("record data runs past the end")
    return _follow(qname, cnames, addrs)


def _follow(qname: str, cnames: Dict[str, Tuple[str, int]],
            addrs: List[Tuple[str, int, bytes, int]]) -> List[Answer]:
    """The question's name through its CNAMEs (a loop or an over-long chain ends it) to
    the addresses owned by the last name reached."""
    chain: List[str] = []
    seen = {qname}
    name, ttl = qname, 1 << 31
    while name in cnames and len(chain) < MAX_CHAIN:
        target, cttl = cnames[name]
        if target in seen:
            break
        seen.add(target)
        chain.append(target)
        name, ttl = target, min(ttl, cttl)
    return [Answer(qname, tuple(chain), fam, addr, min(ttl, attl))
            for owner, fam, addr, attl in addrs if owner == name]


class TCPStreams:
    """DNS over TCP (RFC 1035 4.2.2, RFC 7766): each message behind a 2-byte length, and a
    message may span segments (some servers even write the length on its own). Per
    receiving socket: the sequence number expected next and the bytes of a message not yet
    whole, keyed by the socket's cookie (never reused, unlike its address: a new
    connection's random first sequence number would pass for a retransmission half the
    time). Segments come as the socket receives them, before TCP puts them in order: a
    retransmitted one is trimmed to what is new; after a gap (a segment lost or reordered)
    what was buffered is dropped (counted: tcp_gaps) and the stream starts over at the new
    segment. Bounded: MAX_TCP_STREAMS streams, the least recently active forgotten first
    (counted: tcp_streams_evicted)."""

    def __init__(self, counters: dict):
        self._streams: "OrderedDict[int, Tuple[int, bytes, int]]" = OrderedDict()
        self.counters = counters

    def messages(self, cookie: int, seq: int, payload: bytes, ts_ns: int) -> List[bytes]:
        """The messages this segment completes, in order."""
        end = (seq + len(payload)) & 0xFFFFFFFF
        nxt, buf, last = self._streams.pop(cookie, (seq, b"", ts_ns))
        if ts_ns - last > TCP_STREAM_IDLE_NS:
            nxt, buf = seq, b""
        behind = (nxt - seq) & 0xFFFFFFFF
        if seq != nxt and behind < 1 << 31:  # (partly) sent before: keep what is new
            if behind >= len(payload):
                self._keep(cookie, nxt, buf, ts_ns)
                return []
            payload = payload[behind:]
        elif seq != nxt:  # a gap: what was buffered cannot be completed
            if buf:
                self.counters["tcp_gaps"] += 1
            buf = b""
        buf += payload
        out, pos = [], 0
        while len(buf) - pos >= 2:
            n = buf[pos] << 8 | buf[pos + 1]
            if len(buf) - pos - 2 < n:
                break
            out.append(buf[pos + 2:pos + 2 + n])
            pos += 2 + n
        self._keep(cookie, end, buf[pos:], ts_ns)
        return out

    def forget(self, cookie: int) -> None:
        """The stream cannot be followed (a segment the kernel did not copy whole)."""
        self._streams.pop(cookie, None)

    def _keep(self, cookie: int, nxt: int, buf: bytes, ts_ns: int) -> None:
        self._streams[cookie] = (nxt, buf, ts_ns)
        if len(self._streams) > MAX_TCP_STREAMS:
            self._streams.popitem(last=False)
            self.counters["tcp_streams_evicted"] += 1


class Learned(NamedTuple):
    """One answer for one (net_ns, IP): it names that IP in [since_ns, until_ns)."""
    since_ns: int
    until_ns: int
    name: str
    chain: Tuple[str, ...]


def normalize(name: str) -> str:
    return name.rstrip(".").lower()


def name_matches(pattern: str, learned: Learned) -> bool:
    """pattern "api.example.com": that name exactly; "*.example.com": any name below
    example.com (not example.com itself). Compared with the name asked for and with each
    name of its CNAME chain."""
    names = (learned.name,) + learned.chain
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return any(n.endswith(suffix) for n in names)
    return pattern in names


class NameCache:
    """(net_ns, family, address) -> the answers that named it, newest last; bounded LRU
    (`capacity` keys; the least recently answered key goes first, counted). Thread-safe.

    An answer's validity is [arrival, arrival + max(TTL, floor)); the answer a later one
    for the same key supersedes ends there. The answers stay after their validity ends
    (until the LRU drops them), so events still in the store keep their names."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 floor_seconds: int = DEFAULT_FLOOR_SECONDS):
        self.capacity = capacity
        self.floor_ns = floor_seconds * 1_000_000_000
        self._lock = threading.Lock()
        self._keys: "OrderedDict[Tuple[int, int, bytes], List[Learned]]" = OrderedDict()
        self._names: Dict[str, set] = {}  # every name (asked or chain) -> keys it names
        self._tables: Dict[Optional[str], Tuple[bytes, Dict[int, str]]] = {}  # by version
        self.version = 0
        self.counters = {"packets": 0, "responses": 0, "answers": 0, "evictions": 0,
                         "superseded_dropped": 0, "parse_failures": 0, "truncated": 0,
                         "tcp_gaps": 0, "tcp_streams_evicted": 0}
        self._tcp = TCPStreams(self.counters)

    # ---- learning (the DNS reader thread) ----

    def feed(self, record: bytes) -> None:
        """One record from the kernel: a struct netmon_dns header and its payload (a UDP
        datagram: one message; a TCP segment: what it adds to its stream)."""
        ts_ns, net_ns, length, _, protocol, seq, cookie = _HEADER.unpack_from(record)
        payload = record[_HEADER.size:]
        c = self.counters
        c["packets"] += 1
        if length > len(payload):  # longer than the kernel copies: not parsed
            c["truncated"] += 1
            if protocol == IPPROTO_TCP:
                self._tcp.forget(cookie)
            return
        messages = (self._tcp.messages(cookie, seq, payload, ts_ns)
                    if protocol == IPPROTO_TCP else [payload])
        for m in messages:
            try:
                answers = parse_response(m)
            except DNSError:
                c["parse_failures"] += 1
                continue
            c["responses"] += 1
            for a in answers:
                self.learn(ts_ns, net_ns, a)

    def learn(self, ts_ns: int, net_ns: int, a: Answer) -> None:
        until = ts_ns + max(a.ttl * 1_000_000_000, self.floor_ns)
        key = (net_ns, a.family, a.addr)
        with self._lock:
            self.counters["answers"] += 1
            hist = self._keys.get(key)
            if hist is None:
                hist = self._keys[key] = []
                if len(self._keys) > self.capacity:
                    self._evict()
            else:
                self._keys.move_to_end(key)
            last = hist[-1] if hist else None
            if last and (last.name, last.chain) == (a.name, a.chain) and ts_ns <= last.until_ns:
                hist[-1] = last._replace(until_ns=max(until, last.until_ns))  # a re-answer
            else:
                hist.append(Learned(ts_ns, until, a.name, a.chain))
                for n in (a.name,) + a.chain:
                    self._names.setdefault(n, set()).add(key)
                if len(hist) > HISTORY:
                    self._forget(key, hist.pop(0))
                    self.counters["superseded_dropped"] += 1
            self.version += 1

    def _evict(self) -> None:
        key, hist = self._keys.popitem(last=False)
        for old in hist:
            self._forget(key, old)
        self.counters["evictions"] += 1

    def _forget(self, key, old: Learned) -> None:
        hist = self._keys.get(key, ())
        for n in (old.name,) + old.chain:
            if not any(n == h.name or n in h.chain for h in hist):
                keys = self._names.get(n)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._names[n]

    # ---- reading (queries) ----

    @property
    def size(self) -> int:
        return len(self._keys)

    def lookup(self, net_ns: int, family: int, addr: bytes, ts_ns: int) -> Optional[Learned]:
        """The answer naming this destination at ts_ns: the newest one that arrived by
        then, if its validity still covers ts_ns."""
        if family == AF_INET6 and addr[:12] == _V4MAPPED:
            family, addr = AF_INET, addr[12:]
        with self._lock:
            for h in reversed(self._keys.get((net_ns, family, addr), ())):
                if h.since_ns <= ts_ns:
                    return h if ts_ns < h.until_ns else None
        return None

    def table(self, pattern: Optional[str] = None) -> Tuple[bytes, Dict[int, str]]:
        """(nm_name_window table for the C store, {group: name}): the windows in which an
        event is named by an answer matching `pattern` (None: every answer; group = one
        number per distinct name asked for). Remembered until the cache changes."""
        with self._lock:
            hit = self._tables.get(pattern)
            if hit is not None and hit[0] == self.version:
                return hit[1]
            if pattern is None:
                keys = self._keys.keys()
            elif pattern.startswith("*."):
                suffix = pattern[1:]
                keys = {k for n, ks in self._names.items() if n.endswith(suffix) for k in ks}
            else:
                keys = self._names.get(pattern, ())
            rows, groups = [], {}
            for key in keys:
                hist = self._keys[key]
                for i, h in enumerate(hist):
                    if pattern is not None and not name_matches(pattern, h):
                        continue
                    end = min(h.until_ns, hist[i + 1].since_ns) if i + 1 < len(hist) \
                        else h.until_ns
                    if end > h.since_ns:
                        group = groups.setdefault(h.name, len(groups) + 1)
                        rows.append(_WINDOW.pack(key[0], key[1], 0, key[2].ljust(16, b"\0"),
                                                 h.since_ns, end, group, 0))
            rows.sort(key=lambda r: r[:24])  # the order the C store's binary search expects
            out = (b"".join(rows), {g: n for n, g in groups.items()})
            if len(self._tables) > 64:
                self._tables.clear()
            self._tables[pattern] = (self.version, out)
            return out

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "names_cached": len(self._keys),
                    "capacity": self.capacity, "floor_seconds": self.floor_ns // 10**9}


def window_group(table: bytes, ev) -> int:
    """The group of the window in `table` (NameCache.table) that event ev falls in, 0 if
    none: what the C store's top by name grouped it under."""
    if ev.ip is None or ev.net_ns is None:
        return 0
    fam = AF_INET6 if ":" in ev.ip else AF_INET
    addr = socket.inet_pton(fam, ev.ip)
    if fam == AF_INET6 and addr[:12] == _V4MAPPED:
        fam, addr = AF_INET, addr[12:]
    key = _WINDOW.pack(ev.net_ns, fam, 0, addr.ljust(16, b"\0"), 0, 0, 0, 0)[:24]
    size = _WINDOW.size
    lo, hi = 0, len(table) // size
    while lo < hi:
        mid = (lo + hi) // 2
        if table[mid * size:mid * size + 24] < key:
            lo = mid + 1
        else:
            hi = mid
    while lo < len(table) // size and table[lo * size:lo * size + 24] == key:
        _, _, _, _, since, until, group, _ = _WINDOW.unpack_from(table, lo * size)
        if since <= ev.ts_ns < until:
            return group
        lo += 1
    return 0
