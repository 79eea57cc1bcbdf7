"""Answers are fresh and times are right however the clock stands: a connect that returned
is in the very next answer (read-your-writes), in process and over HTTP, on both
backends; netmon in a time namespace stamps events with the true wall time; and the
root-free suite passes on a boot clock that reads a minute. Needs root."""
import datetime as dt
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, netmon_command, stop

from netmon import Monitor

pytestmark = pytest.mark.bpf
ROUNDS = 200
BACKENDS = ("syscall", "cgroup")
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(ROUNDS + 8)
    yield s
    s.close()


def connect_once(listener):
    """One blocking connect to the listener (returned: the kernel has recorded it)."""
    with socket.create_connection(listener.getsockname()):
        pass
    listener.accept()[0].close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_monitor_query_sees_the_connect_just_made(backend, listener):
    """200 rounds of connect, then at once ask: every round sees its connect. Records sit
    in the ring for up to tens of ms (batched wake-ups), so without the sync most rounds
    would miss."""
    port = listener.getsockname()[1]
    with Monitor(capacity=1 << 20, backend=backend) as m:
        assert m.backend == backend
        misses = []
        for i in range(ROUNDS):
            connect_once(listener)
            seen = m.count(pid=os.getpid(), port=port)
            if seen != i + 1:
                misses.append((i, seen))
        assert misses == []
        # every query method syncs, not only count
        connect_once(listener)
        assert len(m.events(pid=os.getpid(), port=port)) == ROUNDS + 1
        connect_once(listener)
        assert m.query(1, port=port)[1] == ROUNDS + 2
        connect_once(listener)
        assert len(m.latest_per_pid(1000, pid=os.getpid())[0][os.getpid()]) >= ROUNDS + 3
        connect_once(listener)
        assert m.top("port", 1, pid=os.getpid(), port=port)[2] == ROUNDS + 4
        connect_once(listener)
        newest = m.seq_range()[1]
        assert m.events(port=port)[-1].seq <= newest
        before = sum(m.attempts().values())
        connect_once(listener)
        assert sum(m.attempts().values()) >= before + 1
        assert m.stats()["last_seq"] >= m.events(port=port)[-1].seq


def test_a_paused_probe_stays_paused(listener):
    """Tests pause the poll loop to pile records up in the ring: a query must not drain
    it behind their back."""
    port = listener.getsockname()[1]
    with Monitor(capacity=4096, backend="syscall") as m:
        m._pause(True)
        time.sleep(0.05)  # a consume under way when the pause began has finished
        delivered = m.stats()["delivered"]
        connect_once(listener)
        assert m.count(port=port) == 0
        assert m.stats()["delivered"] == delivered
        m._pause(False)
        assert m.count(port=port) == 1


class Client:
    """One kept-alive HTTP connection: asking makes no new connect from this process."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(self, path, body):
        self.conn.request("POST", path, json.dumps(body),
                          {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        assert r.status == 200
        return json.loads(r.read())

    def get(self, path):
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        assert r.status == 200
        return json.loads(r.read())


def start_netmon(*args, wrap=()):
    """The netmon command (under `wrap`, e.g. unshare) on a free port: (process, port)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NETMON_")}
    proc = subprocess.Popen([*wrap, *netmon_command(), "--addr", f"127.0.0.1:{port}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**clean, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline(), f"netmon did not start: {proc.stderr.read()}"
    return proc, port


@pytest.mark.parametrize("backend", BACKENDS)
def test_http_summary_sees_the_connect_just_made(backend, listener):
    """The README's first impression, as a user hits it: connect, then at once POST the
    summary for this pid, 200 times, against the real netmon command."""
    proc, port = start_netmon("--backend", backend)
    try:
        client = Client(port)
        pid = os.getpid()
        base = client.post("/api/connection-summary", {"pid": pid, "duration": 60})
        assert base["total_attempts"] >= 1  # the client's own connect, just made
        misses = []
        for i in range(ROUNDS):
            connect_once(listener)
            got = client.post("/api/connection-summary",
                              {"pid": pid, "duration": 60})["total_attempts"]
            if got != base["total_attempts"] + i + 1:
                misses.append((i, got))
        assert misses == []
        assert client.get("/api/stats")["backend"] == backend
    finally:
        stop(proc)


# ---- the boot clock ----

def uptime_s():
    return float(Path("/proc/uptime").read_text().split()[0])


@pytest.mark.parametrize("shift", ["ahead", "behind"])
def test_events_in_a_time_namespace_carry_the_wall_time(shift, listener):
    """A container runtime may give netmon a time namespace, whose CLOCK_BOOTTIME is
    offset from the kernel's stamps: events still carry the wall time, and windows still
    hold them."""
    offset = 86400 if shift == "ahead" else -int(uptime_s() - 60)
    proc, port = start_netmon("--backend", "syscall",
                              wrap=("unshare", "--time", "--boottime", str(offset)))
    try:
        client = Client(port)
        connect_once(listener)
        now = dt.datetime.now(dt.timezone.utc)
        lport = listener.getsockname()[1]
        (ev,) = client.get(f"/api/events?pid={os.getpid()}&port={lport}")["events"]
        stamped = dt.datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00"))
        assert abs((stamped - now).total_seconds()) < 1
        assert client.post("/api/connection-summary",
                           {"pid": os.getpid(), "duration": 5})["total_attempts"] >= 2
        assert client.get(f"/api/events?pid={os.getpid()}&port={lport}&since=5s")["count"] == 1
        oldest = client.get("/api/stats")["oldest_timestamp"]
        assert oldest is None or oldest <= ev["timestamp"]
    finally:
        stop(proc)


def test_the_suite_passes_on_a_boot_clock_a_minute_old(tmp_path):
    """The root-free tests, run where netmon's boot clock reads ~60 s (a time namespace
    whose offset netmon is kept from seeing, as on a host that just booted): synthetic
    records of any age, and windows reaching before boot, all hold."""
    zero = tmp_path / "timens_offsets"
    zero.write_text("monotonic 0 0\nboottime 0 0\n")
    offset = -int(uptime_s() - 60)
    script = (f"mount --bind {zero} /proc/$$/timens_offsets && exec {sys.executable} -c "
              "'import time, netmon._core as c; print(c.boot_ns() / 1e9, "
              "time.clock_gettime(time.CLOCK_BOOTTIME))'")
    probe = subprocess.run(["unshare", "--mount", "--time", "--boottime", str(offset),
                            "sh", "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    boot, _ = map(float, probe.stdout.split())
    assert 55 < boot < 120, probe.stdout  # netmon reads ~60 s
    script = (f"mount --bind {zero} /proc/$$/timens_offsets && exec {sys.executable} -m "
              f"pytest -q -p no:cacheprovider -m 'not bpf' {TESTS}")
    run = subprocess.run(["unshare", "--mount", "--time", "--boottime", str(offset),
                          "sh", "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
