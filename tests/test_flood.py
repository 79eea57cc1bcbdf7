"""Event flood: connects as fast as two cores allow for 60 s against the real
`netmon`: /health keeps answering, RSS stays flat once the store is full, and every
connect made is stored, evicted or counted as dropped. netmon watches only the load's
cgroup (--cgroup), so the ledger is exact whatever else the machine is doing."""
import http.client
import json
import multiprocessing
import os
import socket
import time

import pytest
from helpers import start, stop

pytestmark = pytest.mark.bpf
SECONDS = float(os.environ.get("NETMON_FLOOD_SECONDS", "60"))
CAPACITY = 1 << 18


def load(cgroup, deadline, counter):
    cgroup.enter()
    n = 0
    while time.monotonic() < deadline:
        for _ in range(1000):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(("127.0.0.1", 9))
            s.close()
        n += 1000
    with counter.get_lock():
        counter.value += n


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_flood_health_memory_and_accounting(cgroup):
    proc, addr, _ = start("--capacity", str(CAPACITY), "--cgroup", cgroup)
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def health():
        conn.request("GET", "/health")
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    try:
        counter = multiprocessing.Value("q", 0)
        deadline = time.monotonic() + SECONDS
        workers = [multiprocessing.Process(target=load, args=(cgroup, deadline, counter))
                   for _ in range(os.cpu_count() or 2)]
        for w in workers:
            w.start()
        latencies, rss = [], []
        while time.monotonic() < deadline:
            t = time.monotonic()
            status, body = health()
            latencies.append(time.monotonic() - t)
            assert status == 200, body
            if body["events_evicted"] > 0:  # the store is full from here on
                rss.append(rss_kib(proc.pid))
            time.sleep(0.05)
        for w in workers:
            w.join()
        time.sleep(0.5)  # the poll loop drains within tens of ms
        _, body = health()
    finally:
        conn.close()
        assert stop(proc) == 0
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    made = counter.value
    assert made > CAPACITY  # the store really overflowed
    assert p99 <= 0.100, f"/health p99 {p99 * 1000:.1f} ms under flood"
    assert len(rss) > 10 and max(rss) - rss[0] < 16 * 1024, rss  # flat once full
    assert body["events_captured"] == made, (body, made)
    assert body["events_captured"] == body["events_dropped"] + body["events_evicted"] + CAPACITY
