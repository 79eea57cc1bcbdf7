"""Kernel tests: the same real clients (curl, blocking and non-blocking Python sockets, a
unix path that does not exist, a UDP connect) under strace, watched by both backends at
once. strace is the reference for what connect() returned; every field each backend
gives is asserted, including which are null on which backend."""
import errno
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from netmon import Monitor

pytestmark = pytest.mark.bpf

# one client making each kind of connect, in this order; prints its pid
PYTHON_CLIENT = r"""
import json, os, select, socket, sys
ports = json.loads(sys.argv[1])
def tcp(port, blocking):
    s = socket.socket()
    s.setblocking(blocking)
    s.connect_ex(("127.0.0.1", port))
    select.select([], [s], [], 5)  # the handshake ends before the socket closes
    s.close()
tcp(ports["open"], True)
tcp(ports["closed"], True)
tcp(ports["open"], False)
tcp(ports["closed"], False)
u = socket.socket(socket.AF_UNIX)
u.connect_ex(ports["missing"])
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
d.connect_ex(("127.0.0.1", 9))
print(os.getpid())
"""

OK, REFUSED = "established", "refused"
# (what the client did, protocol, error, outcome, result, latency known) per connect,
# and what connect() returned; on the cgroup backend unix and UDP are unknown
PYTHON_EXPECT = [
    ("blocking tcp, open", "TCP", 0, None, OK, "ok", True),
    ("blocking tcp, closed", "TCP", -errno.ECONNREFUSED, "ECONNREFUSED", REFUSED, "error",
     True),
    ("non-blocking tcp, open", "TCP", -errno.EINPROGRESS, None, OK, "ok", True),
    ("non-blocking tcp, closed", "TCP", -errno.EINPROGRESS, "ECONNREFUSED", REFUSED, "error",
     True),
    ("unix, missing path", "UNIX", -errno.ENOENT, "ENOENT", None, "error", False),
    ("udp", "UDP", 0, None, None, "ok", False),
]
UNKNOWN_ON_CGROUP = {"UNIX", "UDP"}


def strace_connects(argv):
    """Run argv under strace: (its stdout, [(pid, connect()'s return: 0 or -errno)])."""
    with open("/dev/null", "w") as null:
        out = subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect", "-o",
                              "/dev/stderr", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=null)
    calls = []
    for line in out.stderr.splitlines():
        m = re.match(r"(\d+)\s+connect\(.*\)\s+= (-?\d+)(?: (E[A-Z]+))?", line)
        if m:
            calls.append((int(m.group(1)),
                          -getattr(errno, m.group(3)) if m.group(3) else int(m.group(2))))
    return out.stdout, calls


def settled(mon, pid, n, timeout=3.0):
    """The pid's n events once none has a pending handshake (or by the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        evs = mon.events(pid=pid)
        if (len(evs) >= n and not any(e.result == "pending" for e in evs)) \
                or time.monotonic() > deadline:
            return evs
        time.sleep(0.01)


@pytest.fixture(scope="module")
def both():
    """A monitor on each backend, watching the same connects."""
    with Monitor(capacity=1 << 20, backend="syscall") as sysmon, \
            Monitor(capacity=1 << 20, backend="cgroup") as cgmon:
        yield {"syscall": sysmon, "cgroup": cgmon}


def fields(e):
    return (e.protocol, e.return_code, e.error, e.outcome, e.result, e.latency_us is not None)


@pytest.mark.parametrize("backend", ["syscall", "cgroup"])
def test_python_clients_field_by_field(both, backend, listeners):
    ports = {"open": listeners["tcp4"], "closed": listeners["closed"],
             "missing": listeners["missing"]}
    out, calls = strace_connects([sys.executable, "-c", PYTHON_CLIENT, json.dumps(ports)])
    pid = int(out)
    mon = both[backend]
    evs = settled(mon, pid, len(PYTHON_EXPECT))
    assert [ret for p, ret in calls if p == pid] == [x[2] for x in PYTHON_EXPECT]
    assert_agrees_with_strace(evs, [x[2] for x in PYTHON_EXPECT], backend)
    got = [fields(e) for e in evs]
    want = []
    for _, proto, ret, error, outcome, result, timed in PYTHON_EXPECT:
        if backend == "cgroup" and proto in UNKNOWN_ON_CGROUP:  # the hook runs first
            want.append((proto, None, None, "unknown", "unknown", False))
        else:
            want.append((proto, ret, error, outcome, result, timed))
    assert got == want
    for e in evs:
        assert e.backend == backend and e.kind == "connect" and e.pid == pid
        assert e.latency_us is None or e.latency_us > 0
    # the filters say the same: a refusal is one, whichever call reported it
    assert mon.count(pid=pid, result="ECONNREFUSED") == 2
    assert mon.count(pid=pid, result="EINPROGRESS") == 0  # no handshake left pending
    assert mon.count(pid=pid, result="error") == (2 if backend == "cgroup" else 3)
    assert mon.count(pid=pid, result="ok") == (2 if backend == "cgroup" else 3)
    assert mon.count(pid=pid, result="unknown") == (2 if backend == "cgroup" else 0)
    assert mon.count(pid=pid, result="pending") == 0


@pytest.fixture(scope="module")
def hangup_port():
    """A port that accepts and at once closes: curl connects and ends without waiting."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:  # closed: the module is done
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.shutdown(socket.SHUT_RDWR)
    srv.close()


@pytest.mark.parametrize("backend", ["syscall", "cgroup"])
def test_curl_agrees_with_strace(both, backend, listeners, hangup_port):
    """curl connects non-blocking: EINPROGRESS, then the handshake's outcome."""
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (make deps installs it)")
    results = []
    for port in (hangup_port, listeners["closed"]):
        out, calls = strace_connects(["sh", "-c", "echo $$; exec curl -s -m 2 -o /dev/null "
                                      f"http://127.0.0.1:{port}/"])
        pid = int(out.split()[0])
        rets = [ret for p, ret in calls if p == pid]
        assert rets[-1] == -errno.EINPROGRESS  # after whatever unix sockets curl tries
        evs = settled(both[backend], pid, len(rets))
        assert_agrees_with_strace(evs, rets, backend)
        ev = evs[-1]
        results.append((ev.command, ev.protocol, ev.return_code, ev.error, ev.outcome,
                        ev.result))
        assert ev.latency_us > 0
    assert results == [("curl", "TCP", -errno.EINPROGRESS, None, OK, "ok"),
                       ("curl", "TCP", -errno.EINPROGRESS, "ECONNREFUSED", REFUSED, "error")]


def assert_agrees_with_strace(evs, rets, backend):
    """Every connect strace saw, in order: the syscall backend has its return code
    exactly; the cgroup backend the same for TCP, null for the rest (its hooks run
    before the connect)."""
    assert len(evs) == len(rets)
    for ev, ret in zip(evs, rets):
        if backend == "cgroup" and ev.protocol != "TCP":
            assert (ev.return_code, ev.error, ev.result) == (None, None, "unknown")
        else:
            assert ev.return_code == ret, (ev, ret)


def test_top_and_attempts_count_the_refusals_alike(both, listeners):
    """/api/top's failures and the attempt counters follow the same result on both."""
    before = {b: m.attempts().get(("inet", "tcp", "ECONNREFUSED"), 0)
              for b, m in both.items()}
    ports = {"open": listeners["tcp4"], "closed": listeners["closed"],
             "missing": listeners["missing"]}
    out, _ = strace_connects([sys.executable, "-c", PYTHON_CLIENT, json.dumps(ports)])
    pid = int(out)
    for backend, mon in both.items():
        settled(mon, pid, len(PYTHON_EXPECT))
        rows, _, _ = mon.top("error", 10, pid=pid)
        failed = {(ev.error, n) for ev, n, f in rows}
        expect = {("ECONNREFUSED", 2)} | ({("ENOENT", 1)} if backend == "syscall" else set())
        assert failed == expect, backend
        (dest,), _, _ = mon.top("destination", 10, pid=pid, port=listeners["closed"])
        assert (dest[1], dest[2]) == (2, 2)
        # other connects on the host may be counted at the same time: at least ours
        assert mon.attempts().get(("inet", "tcp", "ECONNREFUSED"), 0) - before[backend] >= 2
        assert mon.stats()["handshakes_in_flight"] >= 0
