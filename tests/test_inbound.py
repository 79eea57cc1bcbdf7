"""Kernel tests, both directions: TCP connections a listener on this host completes are
accept events carrying the listener's process and the client's real source port; a SYN
to a closed port is counted, not stored; outbound connects carry their source port."""
import json
import subprocess
import sys
import time

import pytest
from helpers import run_child

from netmon import Monitor

pytestmark = pytest.mark.bpf

N = 3
LISTENER = r"""
import ctypes, json, socket, sys
ctypes.CDLL(None).prctl(15, b"nm-listener", 0, 0, 0)  # PR_SET_NAME, before listen()
socks = []
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(fam)
    s.bind((host, 0))
    s.listen(16)
    socks.append(s)
print(json.dumps([s.getsockname()[1] for s in socks]), flush=True)
sys.stdin.readline()  # the test's go: accept what came, then exit
for s in socks:
    s.settimeout(5)
    for _ in range(int(sys.argv[1])):
        s.accept()[0].close()
"""


@pytest.fixture(scope="module", params=["syscall", "cgroup"])
def mon(request):
    with Monitor(capacity=1 << 20, backend=request.param) as m:
        yield m


def _wait(mon, n, timeout=2.0, **filters):
    deadline = time.monotonic() + timeout
    while True:
        evs = mon.events(**filters)
        if len(evs) >= n or time.monotonic() > deadline:
            return evs
        time.sleep(0.01)


def test_accepts_over_ipv4_and_ipv6_carry_listener_and_client(mon):
    lst = subprocess.Popen([sys.executable, "-c", LISTENER, str(N)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        port4, port6 = json.loads(lst.stdout.readline())
        client = run_child("nm-client", [
            {"family": "inet", "addr": ["127.0.0.1", port4], "repeat": N},
            {"family": "inet6", "addr": ["::1", port6], "repeat": N}])
        lst.stdin.write("go\n")
        lst.stdin.flush()
        assert lst.wait(timeout=10) == 0
    finally:
        lst.kill()
    sports = [r["sport"] for r in client["results"]]
    evs = _wait(mon, 2 * N, kind="accept", pid=lst.pid)
    time.sleep(0.05)  # nothing more may come
    evs = mon.events(kind="accept", pid=lst.pid)
    assert len(evs) == 2 * N
    expect = [("127.0.0.1", port4, "127.0.0.1", p) for p in sports[:N]] + \
             [("::1", port6, "::1", p) for p in sports[N:]]
    got = sorted((e.ip, e.port, e.source_ip, e.source_port) for e in evs)
    assert got == sorted(expect)
    for e in evs:
        assert (e.kind, e.pid, e.command, e.protocol, e.outcome, e.backend) == \
            ("accept", lst.pid, "nm-listener", "TCP", "established", mon.backend)
        assert e.to_dict()["destination"] == (f"127.0.0.1:{port4}" if e.family == 2
                                              else f"[::1]:{port6}")
    # the client's side: connects by default, never mixed with the accepts
    conns = mon.events(pid=client["pid"])
    assert len(conns) == 2 * N and all(c.kind == "connect" for c in conns)
    assert sorted(c.source_port for c in conns) == sorted(sports)
    assert mon.count(kind="accept", pid=lst.pid, sport=sports[0]) == 1
    assert mon.count(kind="accept", pid=lst.pid, src="::1/128") == N
    assert mon.stats()["inbound"]["accepted"] >= 2 * N


def test_closed_port_is_counted_not_stored(mon, listeners):
    closed = listeners["closed"]
    before = mon.inbound()["closed_port"]
    child = run_child("nm-closed", [{"family": "inet", "addr": ["127.0.0.1", closed],
                                     "repeat": 2}])
    _wait(mon, 2, pid=child["pid"])
    # other processes on this host may hit closed ports too: at least ours are counted
    assert mon.inbound()["closed_port"] - before >= 2
    assert mon.events(kind="accept", port=closed) == []


def test_outbound_source_port_is_the_clients(mon, listeners):
    child = run_child("nm-src", [
        {"family": "inet", "addr": ["127.0.0.1", listeners["tcp4"]]},
        {"family": "inet6", "addr": ["::1", listeners["tcp6"]]},
        {"family": "inet", "type": "dgram", "addr": ["127.0.0.1", 9]},
        {"family": "inet6", "type": "dgram", "addr": ["::1", 9]}])
    evs = _wait(mon, 4, pid=child["pid"])
    sports = [r["sport"] for r in child["results"]]
    assert all(sports)
    if mon.backend == "cgroup":  # the hook runs before the kernel chooses; TCP's outcome
        sports[2:] = [None, None]  # brings it, UDP has none: documented as null
    assert [(e.source_ip, e.source_port) for e in evs] == [
        ("127.0.0.1", sports[0]), ("::1", sports[1]),
        ("127.0.0.1" if sports[2] else None, sports[2]), ("::1" if sports[3] else None,
                                                          sports[3])]


def test_listener_from_before_the_start_is_found_in_proc():
    lst = subprocess.Popen([sys.executable, "-c", LISTENER, "1"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        port4, _ = json.loads(lst.stdout.readline())
        with Monitor(capacity=4096, backend="syscall") as m:  # after listen()
            run_child("nm-client", [{"family": "inet", "addr": ["127.0.0.1", port4]}])
            (ev,) = _wait(m, 1, kind="accept", port=port4)
        lst.stdin.write("go\n")
        lst.stdin.flush()
        lst.wait(timeout=10)
    finally:
        lst.kill()
    assert (ev.pid, ev.command, ev.uid) == (lst.pid, "nm-listener", 0)
