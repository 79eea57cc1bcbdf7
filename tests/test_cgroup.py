"""Kernel tests for the cgroup backend: hooks on the cgroup v2 root."""
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import bpf_ids, run_child, wait_for

from netmon import Monitor
from netmon.host import cgroup2_root

pytestmark = pytest.mark.bpf
URING = os.path.join(os.path.dirname(__file__), "uring_connect.py")


@pytest.fixture(scope="module")
def cgmon():
    with Monitor(capacity=1 << 20, backend="cgroup", udp_sends=True) as m:
        yield m


def uring_connect(port):
    out = subprocess.run([sys.executable, URING, "127.0.0.1", str(port)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_every_family_and_tcp_outcomes(cgmon, listeners):
    L = listeners
    ops = [
        {"family": "inet", "addr": ["127.0.0.1", L["tcp4"]]},
        {"family": "inet6", "addr": ["::1", L["tcp6"]]},
        {"family": "inet", "type": "dgram", "addr": ["127.0.0.1", 53]},
        {"family": "unix", "addr": L["path"]},
        {"family": "unix", "addr": L["abstract"]},
        {"family": "inet", "addr": ["127.0.0.1", L["closed"]]},
        {"family": "inet", "addr": ["127.0.0.1", L["tcp4"]], "nonblock": True},
    ]
    child = run_child("nm-cg-test", ops)
    wait_for(cgmon, child["pid"], len(ops))
    time.sleep(0.05)  # the non-blocking handshake may finish after its event arrived
    evs = cgmon.events(pid=child["pid"])
    got = [(e.family, e.destination, e.protocol, e.return_code, e.outcome) for e in evs]
    assert got == [
        (2, f"127.0.0.1:{L['tcp4']}", "TCP", 0, "established"),
        (10, f"[::1]:{L['tcp6']}", "TCP", 0, "established"),
        (2, "127.0.0.1:53", "UDP", None, "unknown"),
        (1, L["path"], "UNIX", None, "unknown"),
        (1, "@" + L["abstract"][1:], "UNIX", None, "unknown"),
        (2, f"127.0.0.1:{L['closed']}", "TCP", -111, "refused"),
        # what connect() returned on a non-blocking socket, read from its file's flags
        (2, f"127.0.0.1:{L['tcp4']}", "TCP", -115, "established"),
    ]
    for e, res in zip(evs, child["results"]):
        assert e.backend == "cgroup" and e.kind == "connect"
        assert e.command == "nm-cg-test" and e.pid == child["pid"] and e.tid == res["tid"]
        assert e.net_ns == os.stat("/proc/self/ns/net").st_ino
    assert all(e.latency_us > 0 for e in evs if e.protocol == "TCP")
    assert all(e.latency_us is None and e.error is None for e in evs if e.protocol != "TCP")


def test_io_uring_connect_seen_by_cgroup_missed_by_syscall(cgmon, listeners):
    with Monitor(capacity=1 << 20, backend="syscall") as sysmon:
        r = uring_connect(listeners["tcp4"])
        assert r["res"] == 0
        (ev,) = wait_for(cgmon, r["pid"], 1)
        time.sleep(0.05)
        assert sysmon.events(pid=r["pid"]) == []  # the tracepoints never see it
    ev = cgmon.events(pid=r["pid"])[0]
    assert (ev.destination, ev.protocol, ev.outcome) == (
        f"127.0.0.1:{listeners['tcp4']}", "TCP", "established")


def test_process_in_a_child_cgroup(cgmon, listeners, cgroup):
    op = {"family": "inet", "addr": ["127.0.0.1", listeners["tcp4"]]}
    child = run_child("nm-cg-child", [op], preexec_fn=cgroup.enter)
    (ev,) = wait_for(cgmon, child["pid"], 1)
    assert ev.cgroup_id == os.stat(cgroup).st_ino
    assert ev.command == "nm-cg-child"


def test_udp_sendto_deduplicated_per_destination(cgmon):
    code = ("import socket, os\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(1000): s.sendto(b'x', ('127.0.0.1', 9))\n"
            "s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            "for _ in range(10): s6.sendto(b'x', ('::1', 9))\n"
            "print(os.getpid())\n")
    pid = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True).stdout)
    deadline = time.monotonic() + 3
    while len(cgmon.events(pid=pid, kind="udp_send")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    evs = cgmon.events(pid=pid, kind="udp_send")
    assert sorted((e.destination, e.packets, e.protocol) for e in evs) == [
        ("127.0.0.1:9", 1000, "UDP"), ("[::1]:9", 10, "UDP")]
    assert cgmon.events(pid=pid) == []  # the predecessor's kind: connects only


def _attached_ids():
    """Programs on the cgroup root (bpftool 7.1's cgroup tree does not know attach type 49,
    connect_unix, so links are checked too) and programs behind any link."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "tree", cgroup2_root()],
                         capture_output=True, text=True).stdout
    tree = {p.get("id") for entry in json.loads(out or "[]") for p in entry.get("programs", [])}
    return tree, {link.get("prog_id") for link in bpf_ids("link")}


def test_nothing_left_on_the_cgroup_root_after_exit_or_kill():
    with Monitor(capacity=1024, backend="cgroup", udp_sends=True) as m:
        ids = {name: s["id"] for name, s in m.program_stats().items()}
        assert len(ids) == 7
        tree, links = _attached_ids()
        assert {i for n, i in ids.items() if n.startswith("netmon_cg_")
                and n != "netmon_cg_connect_unix"} <= tree
        assert set(ids.values()) <= links
    tree, links = _attached_ids()
    assert not set(ids.values()) & (tree | links)

    code = ("import json, time, netmon\n"
            "m = netmon.Monitor(capacity=1024, backend='cgroup').start()\n"
            "print(json.dumps(sorted(s['id'] for s in m.program_stats().values())), flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    ids = set(json.loads(p.stdout.readline()))
    assert ids <= _attached_ids()[1]
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while ids & set.union(*_attached_ids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ids & set.union(*_attached_ids())


def test_backend_reported(cgmon):
    st = cgmon.stats()
    assert st["backend"] == "cgroup" and st["missing_hooks"] == []
    assert {"netmon_cg_connect4", "netmon_cg_connect6", "netmon_cg_connect_unix",
            "netmon_tcp_state"} <= set(st["programs"])
    assert "netmon_connect_enter" not in st["programs"]


@pytest.mark.parametrize("backend", ["syscall", "cgroup"])
def test_scoped_to_one_cgroup(cgroup, backend, listeners):
    ops = [{"family": "inet", "type": "dgram", "addr": ["127.0.0.1", 9], "repeat": 5},
           {"family": "inet", "addr": ["127.0.0.1", listeners["closed"]]}]
    with Monitor(capacity=1024, backend=backend, cgroup=cgroup) as m:
        outside = run_child("nm-outside", ops)
        inside = run_child("nm-inside", ops, preexec_fn=cgroup.enter)
        evs = wait_for(m, inside["pid"], 6)
        time.sleep(0.05)
        assert len(evs) == 6 and evs[-1].outcome == "refused"
        assert m.events(pid=outside["pid"]) == []
        st = m.stats()
        assert st["delivered"] == 6 and st["dropped_total"] == 0
        assert st["outcomes_lost"] == {"ringbuf_full": 0, "unmatched": 0}


def test_auto_is_the_default_and_picks_cgroup_here():
    """The benchmark showed the cgroup backend at least as good on every row, so auto is
    the default: on this kernel (6.2+, cgroup v2, root) it resolves to cgroup."""
    with Monitor(capacity=64) as m:
        assert m.backend == "cgroup" and m.stats()["backend"] == "cgroup"
