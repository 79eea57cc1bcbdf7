"""Destination names without a kernel: the strict DNS parser (fuzzed: truncation, pointer
loops, huge counts, random corruption), the name cache's windows, and name= / top by name
answered by the C store from synthetic records."""
import random
import socket
import struct
import time

import dns.edns
import dns.message
import dns.rrset
import pytest

from netmon import _core
from netmon.dns import Answer, DNSError, NameCache, parse_response
from netmon.filters import FilterError, compile_filter
from netmon.monitor import Monitor
from netmon.testing import CLOCK_SHIFT_NS, record

NS = 4026531840
SEC = 1_000_000_000


def response(qname, *rrsets, rdtype="A", edns=False, rcode=0):
    q = dns.message.make_query(qname, rdtype, use_edns=0 if edns else None)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for owner, ttl, typ, *values in rrsets:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", typ, *values))
    return r.to_wire()


CHAIN = response("WWW.Shop.test.", ("www.shop.test.", 30, "CNAME", "edge.shop.test."),
                 ("edge.shop.test.", 600, "CNAME", "e1.cdn.test."),
                 ("e1.cdn.test.", 120, "A", "192.0.2.7", "192.0.2.8"), edns=True)


def test_chain_several_answers_edns_and_min_ttl():
    got = sorted(parse_response(CHAIN))
    assert got == [Answer("www.shop.test", ("edge.shop.test", "e1.cdn.test"), socket.AF_INET,
                          socket.inet_aton(ip), 30) for ip in ("192.0.2.7", "192.0.2.8")]


def test_aaaa_direct_and_answers_for_other_names_ignored():
    msg = response("v6.test.", ("v6.test.", 77, "AAAA", "2001:db8::1"),
                   ("unrelated.test.", 5, "A", "192.0.2.99"), rdtype="AAAA")
    assert parse_response(msg) == [Answer("v6.test", (), socket.AF_INET6,
                                          socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 77)]


def test_error_responses_and_cname_loops_name_nothing():
    assert parse_response(response("gone.test.", rcode=3)) == []  # NXDOMAIN
    loop = response("a.test.", ("a.test.", 5, "CNAME", "b.test."),
                    ("b.test.", 5, "CNAME", "a.test."), ("a.test.", 5, "A", "192.0.2.1"))
    assert parse_response(loop) == []  # the chain loops back: a.test is not its end


def test_a_query_is_not_a_response():
    with pytest.raises(DNSError):
        parse_response(dns.message.make_query("x.test.", "A").to_wire())


@pytest.mark.parametrize("msg", [CHAIN, response("v6.test.", ("v6.test.", 1, "AAAA", "::1"))])
def test_every_truncation_fails_cleanly(msg):
    for n in range(len(msg)):
        try:
            parse_response(msg[:n])
        except DNSError:
            continue
        pytest.fail(f"a message cut at {n} of {len(msg)} bytes parsed")


def header(an=1, qd=1):
    return struct.pack("!6H", 0x1234, 0x8180, qd, an, 0, 0)


def test_compression_loops_and_forward_pointers_are_refused():
    q = b"\x01a\x04test\x00" + b"\x00\x01\x00\x01"
    self_loop = header() + q + b"\xc0\x1d" + b"\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + \
        b"\x01\x02\x03\x04"  # the answer's name points at itself (offset 29)
    forward = header() + q + b"\xc0\x40" + b"\x00" * 14
    two_step = header(qd=1) + b"\x01a\xc0\x0e" + b"\x00\x01\x00\x01"  # 12 -> 14 -> 12...
    for msg in (self_loop, forward, two_step):
        started = time.monotonic()
        with pytest.raises(DNSError):
            parse_response(msg)
        assert time.monotonic() - started < 0.1


def test_huge_counts_and_overlong_names_are_refused():
    q = b"\x01a\x04test\x00\x00\x01\x00\x01"
    with pytest.raises(DNSError, match="more answers"):
        parse_response(header(an=65535) + q + b"\x00" * 40)
    long_name = b"".join(b"\x3f" + b"x" * 63 for _ in range(5)) + b"\x00"
    with pytest.raises(DNSError, match="255"):
        parse_response(header(an=0) + long_name + b"\x00\x01\x00\x01")


def test_random_corruption_never_crashes_or_stalls():
    """Seeded: byte flips, splices and truncations of real answers; only DNSError or a
    list of well-formed answers may come out, and every parse ends (a parse takes tens of
    µs; the bound below only catches a loop or a blow-up, never a slow machine)."""
    rng = random.Random(1234)
    seeds = [CHAIN, response("v6.test.", ("v6.test.", 9, "AAAA", "2001:db8::2"), edns=True)]
    worst = 0.0
    for _ in range(4000):
        msg = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            i = rng.randrange(len(msg))
            if op < 0.6:
                msg[i] = rng.randrange(256)
            elif op < 0.8:
                msg[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                del msg[i:]
                if not msg:
                    msg = bytearray(b"\0")
        started = time.perf_counter()
        try:
            out = parse_response(bytes(msg))
        except DNSError:
            out = []
        worst = max(worst, time.perf_counter() - started)
        for a in out:
            assert len(a.addr) in (4, 16) and isinstance(a.name, str) and a.ttl >= 0
    assert worst < 1.0


def dns_record(payload, ts_ns, net_ns=NS, protocol=17, length=None, seq=0, sock=0):
    return struct.pack("=QIIHHIQ", ts_ns, net_ns, len(payload) if length is None else length,
                       2, protocol, seq, sock) + payload


def tcp_stream(*messages):
    return b"".join(struct.pack("!H", len(m)) + m for m in messages)


def test_tcp_answers_split_across_segments_are_put_together():
    """The length alone, a message cut anywhere, two in one segment, a retransmission,
    sequence numbers wrapping, two connections interleaved: every answer learned once."""
    c = NameCache(floor_seconds=60)
    now = _core.boot_ns()
    other = a_answer("other.test", "192.0.2.99", 30)
    wire = tcp_stream(CHAIN, other, CHAIN)
    seq0 = 2**32 - 7  # wraps inside the second segment
    cuts = [0, 2, 40, len(CHAIN) + 5, len(wire) - 3, len(wire)]
    segments = [(seq0 + a & 0xFFFFFFFF, wire[a:b]) for a, b in zip(cuts, cuts[1:])]
    interleaved = tcp_stream(other)
    for i, (seq, part) in enumerate(segments):
        c.feed(dns_record(part, now, protocol=6, seq=seq, sock=11))
        if i == 1:  # a retransmission of what came already, and another connection
            c.feed(dns_record(part, now, protocol=6, seq=seq, sock=11))
            c.feed(dns_record(interleaved[:3], now, protocol=6, seq=500, sock=12))
            c.feed(dns_record(interleaved[3:], now, protocol=6, seq=503, sock=12))
    s = c.stats()
    assert (s["packets"], s["responses"], s["parse_failures"], s["tcp_gaps"]) == (8, 4, 0, 0)
    assert c.lookup(NS, socket.AF_INET, socket.inet_aton("192.0.2.7"), now + 1).name == \
        "www.shop.test"
    assert c.lookup(NS, socket.AF_INET, socket.inet_aton("192.0.2.99"), now + 1).name == \
        "other.test"


def test_a_tcp_gap_drops_the_partial_message_and_is_counted():
    c = NameCache(floor_seconds=60)
    now = _core.boot_ns()
    wire = tcp_stream(CHAIN)
    c.feed(dns_record(wire[:20], now, protocol=6, seq=100, sock=5))
    c.feed(dns_record(wire[30:], now, protocol=6, seq=130, sock=5))  # 10 bytes never came
    assert (c.stats()["tcp_gaps"], c.stats()["responses"]) == (1, 0)
    c.feed(dns_record(wire, now, protocol=6, seq=1, sock=6))
    c.feed(dns_record(wire, now, protocol=6, seq=7000, sock=6))  # restarts, nothing lost
    assert (c.stats()["tcp_gaps"], c.stats()["responses"]) == (1, 2)  # nothing was lost
    c.feed(dns_record(wire, now, protocol=6, seq=1, sock=7, length=5000))  # not copied whole
    assert c.stats()["truncated"] == 1


def a_answer(name, ip, ttl):
    return response(name + ".", (name + ".", ttl, "A", ip))


def test_cache_counts_failures_truncation_and_answers():
    c = NameCache(floor_seconds=60)
    now = _core.boot_ns()
    c.feed(dns_record(CHAIN, now))
    c.feed(dns_record(b"\xff" * 30, now))
    c.feed(dns_record(CHAIN[:100], now, length=5000))
    s = c.stats()
    assert (s["packets"], s["responses"], s["answers"], s["parse_failures"], s["truncated"],
            s["names_cached"]) == (3, 1, 2, 1, 1, 2)
    assert c.lookup(NS, socket.AF_INET, socket.inet_aton("192.0.2.7"), now + 1).name == \
        "www.shop.test"
    assert c.lookup(NS + 1, socket.AF_INET, socket.inet_aton("192.0.2.7"), now + 1) is None


def test_ttl_floor_most_recent_answer_and_eviction():
    c = NameCache(capacity=2, floor_seconds=60)
    ip = socket.inet_aton("192.0.2.1")
    t = 1000 * SEC
    c.learn(t, NS, Answer("a.test", (), socket.AF_INET, ip, 5))  # floor: valid 60 s
    c.learn(t + 10 * SEC, NS, Answer("b.test", (), socket.AF_INET, ip, 3600))
    assert c.lookup(NS, socket.AF_INET, ip, t + 59 * SEC).name == "b.test"
    assert c.lookup(NS, socket.AF_INET, ip, t + 5 * SEC).name == "a.test"
    assert c.lookup(NS, socket.AF_INET, ip, t - 1) is None
    # v4-mapped IPv6 destinations are the IPv4 address
    assert c.lookup(NS, socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + ip, t + SEC).name == "a.test"
    c.learn(t, NS, Answer("c.test", (), socket.AF_INET, b"\x01\x01\x01\x01", 5))
    c.learn(t, NS, Answer("d.test", (), socket.AF_INET, b"\x02\x02\x02\x02", 5))
    s = c.stats()
    assert (s["evictions"], s["names_cached"]) == (1, 2)
    assert c.lookup(NS, socket.AF_INET, ip, t + SEC) is None  # the oldest key went
    assert c.table("a.test")[0] == b""


def test_name_filter_validation():
    assert compile_filter(name="API.Example.COM.").store["name"] == "api.example.com"
    assert compile_filter(name="*.example.com").store["name"] == "*.example.com"
    for bad in ("", "a..b", "*", "a.*.b", "-a.test", "x" * 64 + ".test", 5):
        with pytest.raises(FilterError, match="name"):
            compile_filter(name=bad)


def test_names_off_is_a_clear_error():
    m = Monitor(capacity=16)
    with pytest.raises(FilterError, match="--dns-names"):
        m.events(name="a.test")
    with pytest.raises(FilterError, match="--dns-names"):
        m.top("name")


def test_store_filters_and_groups_by_name_windows():
    """The C store answers name= and top by name exactly as events are named."""
    m = Monitor(capacity=64, dns_names=True, names_floor_seconds=60)
    m._clock_shift_ns = CLOCK_SHIFT_NS  # as testing.synthetic_monitor: records of any age fit
    now = m.clock_ns()
    ip = "192.0.2.1"
    m.names.learn(now - 30 * SEC, NS, Answer("a.test", ("cdn.test",), socket.AF_INET,
                                             socket.inet_aton(ip), 5))
    m.names.learn(now - 20 * SEC, NS, Answer("b.test", (), socket.AF_INET,
                                             socket.inet_aton(ip), 5))
    m.names.learn(now - 20 * SEC, NS + 1, Answer("c.test", (), socket.AF_INET,
                                                 socket.inet_aton(ip), 5))
    m.inject(record(ip=ip, ts_ns=now - 25 * SEC, pid=1))  # a.test's time
    m.inject(record(ip=ip, ts_ns=now - 15 * SEC, pid=2))  # b.test's
    m.inject(record(ip=ip, ts_ns=now - 15 * SEC, pid=3, net_ns=NS + 1))  # c.test's namespace
    m.inject(record(ip="::ffff:" + ip, ts_ns=now - 14 * SEC, pid=4))  # mapped: b.test
    m.inject(record(ip="192.0.2.2", ts_ns=now - 14 * SEC, pid=5))  # no answer
    named = {e.pid: (e.destination_name, e.destination_cname_chain) for e in m.events()}
    assert named == {1: ("a.test", ("cdn.test",)), 2: ("b.test", None), 3: ("c.test", None),
                     4: ("b.test", None), 5: (None, None)}
    assert [e.pid for e in m.events(name="a.test")] == [1]
    assert [e.pid for e in m.events(name="*.test")] == [1, 2, 3, 4]
    assert [e.pid for e in m.events(name="cdn.test")] == [1]  # a CNAME on the chain
    assert [e.pid for e in m.events(name="b.test")] == [2, 4]
    assert m.events(name="nothing.test") == []
    assert m.count(name="c.test") == 1
    rows, groups, matched = m.top("name")
    # largest first, ties newest first; the unnamed events are one group
    assert [(ev.destination_name, n) for ev, n, _ in rows] == [
        ("b.test", 2), (None, 1), ("c.test", 1), ("a.test", 1)]
    assert (groups, matched) == (4, 5)
    assert m.stats()["dns"]["enabled"] is True
