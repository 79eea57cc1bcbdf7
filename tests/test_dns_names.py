"""Destination names on the real kernel: a DNS server in the test (tests/dnsserver.py) on a
loopback address's port 53, clients resolving through it (dnspython over UDP, dig over TCP
with EDNS) and connecting to the answered address; answers in another network namespace;
hostile payloads from port 53."""
import os
import random
import socket
import subprocess
import sys
import time

import dns.message
import dns.query
import pytest

from netmon.monitor import Monitor

pytestmark = pytest.mark.bpf
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dnsserver import Server  # noqa: E402

RNG = random.Random()
SERVER = f"127.53.{RNG.randrange(1, 255)}.{RNG.randrange(1, 255)}"  # tests may run side by side


def ip_for(n: int) -> str:
    return f"127.54.{RNG.randrange(1, 255)}.{n}"


IPS = {k: ip_for(i) for i, k in enumerate(("chain", "two", "ns", "hostile"), start=1)}
ZONE = {
    "www.shop.test": [("CNAME", 300, "edge.shop.test.")],
    "edge.shop.test": [("CNAME", 30, "e1.cdn.test.")],
    "e1.cdn.test": [("A", 120, IPS["chain"])],
    "v6.shop.test": [("AAAA", 45, "::1")],
    "a.two.test": [("A", 1, IPS["two"])],  # below the floor: still names for minutes
    "b.two.test": [("A", 7200, IPS["two"])],
    "host.ns.test": [("A", 60, IPS["ns"])],
    "split.shop.test": [("CNAME", 60, "e1.cdn.test.")],  # answered in 3 TCP segments
}


@pytest.fixture(scope="module")
def server():
    s = Server(SERVER, ZONE)
    yield s
    s.close()


@pytest.fixture(scope="module")
def mon():
    with Monitor(capacity=1 << 20, dns_names=True) as m:  # roomy: the host may be busy
        yield m


def listener(ip: str) -> socket.socket:
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    s = socket.socket(fam)
    s.bind((ip, 0))
    s.listen(8)
    return s


def resolve(name: str, rdtype: str = "A") -> str:
    reply = dns.query.udp(dns.message.make_query(name, rdtype), SERVER, timeout=2)
    return reply.answer[-1][0].address


def connect(ip: str, port: int):
    c = socket.create_connection((ip, port), timeout=2)
    c.close()


def settled(query, n: int, timeout: float = 2.0):
    """query()'s events once there are n of them (the poll thread drains every 10 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        events = query()
        if len(events) >= n or time.monotonic() > deadline:
            assert len(events) == n, events
            return events


def only(query):
    return settled(query, 1)[0]


def test_udp_answer_through_cname_chain_names_the_connect(server, mon):
    with listener(IPS["chain"]) as lst:
        ip = resolve("WWW.shop.test")  # case does not matter
        assert ip == IPS["chain"]
        connect(ip, lst.getsockname()[1])
        ev = only(lambda: mon.events(dest=ip, pid=os.getpid()))
    assert ev.destination_name == "www.shop.test"
    assert ev.destination_cname_chain == ("edge.shop.test", "e1.cdn.test")
    d = ev.to_dict()
    assert d["destination_name"] == "www.shop.test"
    assert d["destination_cname_chain"] == ["edge.shop.test", "e1.cdn.test"]
    assert [e.seq for e in mon.events(name="*.cdn.test", pid=os.getpid())] == [ev.seq]


def test_dig_over_tcp_with_edns_names_an_ipv6_connect(server, mon):
    before = mon.stats()["dns"]
    out = subprocess.run(["dig", f"@{SERVER}", "+tcp", "+edns=0", "+short", "+tries=1",
                          "+time=2", "AAAA", "v6.shop.test"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["::1"]
    with listener("::1") as lst:
        connect("::1", lst.getsockname()[1])
        ev = only(lambda: mon.events(dest="::1", port=lst.getsockname()[1]))
    assert (ev.destination_name, ev.destination_cname_chain) == ("v6.shop.test", None)
    after = mon.stats()["dns"]
    assert after["responses"] > before["responses"]
    assert after["parse_failures"] == before["parse_failures"]


def test_a_tcp_answer_split_across_segments_names_the_connect(server, mon):
    """The server writes the length alone, then the message in two parts, each its own
    segment: netmon puts the stream together (one response, no parse failure)."""
    before = mon.stats()["dns"]
    out = subprocess.run(["dig", f"@{SERVER}", "+tcp", "+short", "+tries=1", "+time=2",
                          "split.shop.test"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["e1.cdn.test.", IPS["chain"]]
    with listener(IPS["chain"]) as lst:
        connect(IPS["chain"], lst.getsockname()[1])
        ev = only(lambda: mon.events(dest=IPS["chain"], port=lst.getsockname()[1]))
    assert (ev.destination_name, ev.destination_cname_chain) == (
        "split.shop.test", ("e1.cdn.test",))
    after = mon.stats()["dns"]
    assert (after["packets"] - before["packets"], after["responses"] - before["responses"],
            after["parse_failures"], after["tcp_gaps"]) == (
        3, 1, before["parse_failures"], before["tcp_gaps"])


def test_two_names_for_one_ip_newest_wins_both_findable(server, mon):
    me = os.getpid()
    with listener(IPS["two"]) as lst:
        port = lst.getsockname()[1]
        assert resolve("a.two.test") == IPS["two"]
        connect(IPS["two"], port)
        time.sleep(0.01)
        assert resolve("b.two.test") == IPS["two"]
        connect(IPS["two"], port)
        evs = settled(lambda: mon.events(dest=IPS["two"], pid=me), 2)
    assert [e.destination_name for e in evs] == ["a.two.test", "b.two.test"]
    assert [e.seq for e in mon.events(name="a.two.test", pid=me)] == [evs[0].seq]
    assert [e.seq for e in mon.events(name="b.two.test", pid=me)] == [evs[1].seq]
    assert [e.seq for e in mon.events(name="*.two.test", pid=me)] == [e.seq for e in evs]
    top, _, _ = mon.top("name", 50, pid=me, dest=IPS["two"])
    assert sorted((e.destination_name, n) for e, n, _ in top) == [("a.two.test", 1),
                                                                  ("b.two.test", 1)]


def test_another_network_namespace_gets_its_own_answers(server, mon):
    """Same IP, two namespaces, two names: each connect is named by its namespace's answer."""
    with listener(IPS["ns"]) as lst:
        assert resolve("host.ns.test") == IPS["ns"]
        connect(IPS["ns"], lst.getsockname()[1])
        out = subprocess.run(["unshare", "--net", sys.executable,
                              os.path.join(HERE, "dnsserver.py"), "inner.ns.test", IPS["ns"]],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        inner_ns, inner_pid = map(int, out.stdout.split())
        host = only(lambda: mon.events(dest=IPS["ns"], pid=os.getpid()))
        inner = only(lambda: mon.events(dest=IPS["ns"], pid=inner_pid))
    assert inner.net_ns == inner_ns != host.net_ns
    assert host.destination_name == "host.ns.test"
    assert inner.destination_name == "inner.ns.test"
    assert [e.pid for e in mon.events(name="inner.ns.test", dest=IPS["ns"])] == [inner_pid]


HOSTILE = [
    b"",  # nothing
    b"\x12\x34",  # shorter than a header
    dns.message.make_query("q.test", "A").to_wire(),  # a query, not a response
    bytes.fromhex("123481800001000100000000") + b"\xc0\x0c" + b"\x00\x01\x00\x01" +
    b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04\x7f\x00\x00\x01",  # pointer to itself
    bytes.fromhex("12348180000100ff00000000") + b"\x01a\x00\x00\x01\x00\x01",  # 255 answers
    bytes.fromhex("123481800001000100000000") + b"\x01a\x00\x00\x01\x00\x01" +
    b"\x01a\x00\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04\x7f\x00",  # A record cut short
    os.urandom(300),
]


def test_hostile_payloads_from_port_53_change_nothing_and_are_counted(server, mon):
    me = os.getpid()
    with listener(IPS["hostile"]) as lst:
        mon.sync_names()
        before = mon.stats()["dns"]
        victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        victim.bind(("127.0.0.1", 0))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((ip_for(200), 53))
        for payload in HOSTILE[1:]:
            sender.sendto(payload, victim.getsockname())
            victim.recv(4096)
        sender.sendto(HOSTILE[0], victim.getsockname())  # empty: not even passed up
        victim.recv(4096)
        connect(IPS["hostile"], lst.getsockname()[1])
        ev = only(lambda: mon.events(dest=IPS["hostile"], pid=me))
        after = mon.stats()["dns"]
        sender.close()
        victim.close()
    assert ev.destination_name is None
    assert after["parse_failures"] - before["parse_failures"] == len(HOSTILE) - 1
    assert after["packets"] - before["packets"] == len(HOSTILE) - 1
    assert (after["names_cached"], after["answers"], after["evictions"]) == \
        (before["names_cached"], before["answers"], before["evictions"])
    assert mon.health() == (True, None)
