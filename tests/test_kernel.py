"""Kernel tests: load and attach the real programs, make real connects, check every field."""
import errno
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import bpf_ids, child_env, run_child, wait_for, wait_progs_unloaded

from netmon import Monitor, _core

pytestmark = pytest.mark.bpf


@pytest.fixture(scope="module")
def mon():
    with Monitor(capacity=1 << 20, backend="syscall") as m:  # roomy: the host may be busy
        yield m


def test_every_kind_of_connect_every_field(mon, listeners):
    L = listeners
    ops = [
        {"family": "inet", "addr": ["127.0.0.1", L["tcp4"]]},
        {"family": "inet6", "addr": ["::1", L["tcp6"]]},
        {"family": "inet", "type": "dgram", "addr": ["127.0.0.1", 53]},
        {"family": "unix", "addr": L["path"]},
        {"family": "unix", "addr": L["abstract"]},
        {"family": "inet", "addr": ["127.0.0.1", L["closed"]]},
        {"family": "inet", "addr": ["127.0.0.1", L["tcp4"]], "nonblock": True},
        {"family": "unix", "addr": L["missing"]},
        {"family": "inet6", "type": "dgram", "addr": ["::1", 443], "thread": True},
    ]
    t0 = time.time()
    child = run_child("nm-kernel-test", ops)
    pid = child["pid"]
    evs = wait_for(mon, pid, len(ops))
    deadline = time.monotonic() + 2  # the non-blocking handshake's outcome may trail it
    while any(e.result == "pending" for e in evs) and time.monotonic() < deadline:
        evs = mon.events(pid=pid)
    assert len(evs) == len(ops)
    rets = [r["ret"] for r in child["results"]]
    assert rets == [0, 0, 0, 0, 0, -errno.ECONNREFUSED, -errno.EINPROGRESS, -errno.ENOENT, 0]
    expect = [
        # family, destination, ip, port, socket_type, protocol
        (2, f"127.0.0.1:{L['tcp4']}", "127.0.0.1", L["tcp4"], "STREAM", "TCP"),
        (10, f"[::1]:{L['tcp6']}", "::1", L["tcp6"], "STREAM", "TCP"),
        (2, "127.0.0.1:53", "127.0.0.1", 53, "DGRAM", "UDP"),
        (1, L["path"], None, None, "STREAM", "UNIX"),
        (1, "@" + L["abstract"][1:], None, None, "STREAM", "UNIX"),
        (2, f"127.0.0.1:{L['closed']}", "127.0.0.1", L["closed"], "STREAM", "TCP"),
        (2, f"127.0.0.1:{L['tcp4']}", "127.0.0.1", L["tcp4"], "STREAM", "TCP"),
        (1, L["missing"], None, None, "STREAM", "UNIX"),
        (10, "[::1]:443", "::1", 443, "DGRAM", "UDP"),
    ]
    cgroup_id = os.stat(_my_cgroup_dir()).st_ino if _my_cgroup_dir() else None
    for ev, res, exp in zip(evs, child["results"], expect):
        assert (ev.family, ev.destination, ev.ip, ev.port, ev.socket_type, ev.protocol) == exp
        assert ev.return_code == res["ret"]
        # the failure's errno: none for the non-blocking connect that went on to connect
        assert ev.error == (errno.errorcode[-res["ret"]] if res["ret"] and
                            res["ret"] != -errno.EINPROGRESS else None)
        assert ev.pid == pid and ev.tid == res["tid"]
        assert ev.uid == os.getuid()
        assert ev.command == "nm-kernel-test"
        assert ev.truncated is False
        assert t0 - 1 < ev.timestamp.timestamp() < time.time() + 1
        if cgroup_id is not None:
            assert ev.cgroup_id == cgroup_id
    assert evs[-1].tid != pid  # the threaded connect
    assert [e.seq for e in evs] == sorted(e.seq for e in evs)


def test_tcp_outcome_and_latency_joined_to_the_connect(mon, listeners):
    L = listeners
    ops = [
        {"family": "inet", "addr": ["127.0.0.1", L["tcp4"]]},
        {"family": "inet", "addr": ["127.0.0.1", L["closed"]]},
        {"family": "inet6", "addr": ["::1", L["tcp6"]], "nonblock": True},
        {"family": "inet", "type": "dgram", "addr": ["127.0.0.1", 9]},
    ]
    child = run_child("nm-outcome", ops)
    evs = wait_for(mon, child["pid"], len(ops))
    time.sleep(0.05)  # the non-blocking handshake's outcome may trail its connect event
    evs = mon.events(pid=child["pid"])
    assert [(e.return_code, e.outcome) for e in evs] == [
        (0, "established"), (-errno.ECONNREFUSED, "refused"),
        (-errno.EINPROGRESS, "established"), (0, None)]
    assert all(e.latency_us > 0 for e in evs[:3]) and evs[3].latency_us is None
    assert all(e.kind == "connect" and e.backend == "syscall" for e in evs)
    netns = os.stat("/proc/self/ns/net").st_ino
    assert all(e.net_ns == netns for e in evs)
    assert mon.stats()["outcomes_lost"]["ringbuf_full"] == 0


def _my_cgroup_dir():
    """This process's cgroup v2 directory (the child inherits it); its inode is the id."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                rel = line.strip()[3:]
                for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                    p = root + rel
                    if os.path.isdir(p) and os.path.exists(os.path.join(root, "cgroup.procs")):
                        return p
    return None


def test_long_unix_path_is_truncated_and_flagged(mon):
    d = tempfile.mkdtemp()
    path = os.path.join(d, "p" * (100 - len(d)))
    child = run_child("nm-long-path", [{"family": "unix", "addr": path}])
    (ev,) = wait_for(mon, child["pid"], 1)
    assert ev.truncated is True
    assert ev.destination == path[:_core.ADDR_LEN]
    assert ev.return_code == -errno.ENOENT


def test_summary_queries_on_real_events(mon, listeners):
    child = run_child("nm-count", [{"family": "inet", "type": "dgram",
                                    "addr": ["127.0.0.1", 9], "repeat": 25}])
    evs = wait_for(mon, child["pid"], 25)
    assert len(evs) == 25
    assert mon.count(pid=child["pid"]) == 25
    assert mon.count(command="nm-count") >= 25
    per_pid, truncated = mon.latest_per_pid(limit=10, pid=child["pid"])
    assert [e.seq for e in per_pid[child["pid"]]] == [e.seq for e in evs[-10:]]
    assert truncated is True


def test_health_and_stats_while_running(mon):
    ok, reason = mon.health()
    assert ok, reason
    st = mon.stats()
    assert st["attached"] is True
    assert set(st["programs"]) == {"netmon_connect_enter", "netmon_connect_exit",
                                   "netmon_tcp_state", "netmon_tcp_reset"}
    assert st["poll_lag_seconds"] < 1.0
    assert st["captured"] == st["delivered"] + st["dropped_total"]


def test_drops_are_counted_exactly(cgroup):
    """A one-page ring and a paused consumer: what is not delivered is counted. Scoped to
    the child's cgroup, so nothing else on the machine takes a slot or a drop."""
    n = 300
    ops = [{"family": "inet", "type": "dgram", "addr": ["127.0.0.1", 9], "repeat": n}]
    with Monitor(capacity=4096, ringbuf_bytes=os.sysconf("SC_PAGE_SIZE"), cgroup=cgroup) as m:
        m._pause(True)
        time.sleep(0.05)  # let a poll in progress finish
        child = run_child("nm-drops", ops, preexec_fn=cgroup.enter)
        m._pause(False)
        time.sleep(0.1)
        delivered = m.count(pid=child["pid"])
        st = m.stats()
    assert st["dropped"]["ringbuf_full"] > 0 and delivered > 0
    assert delivered + st["dropped"]["ringbuf_full"] == n == st["captured"]


def test_nothing_left_attached_after_exit():
    with Monitor(capacity=1024, backend="syscall") as m:
        ids = {s["id"] for s in m.program_stats().values()}
        assert len(ids) == 4
        assert ids <= {p["id"] for p in bpf_ids("prog")}
        assert ids <= {link.get("prog_id") for link in bpf_ids("link")}
    assert not ids & {p["id"] for p in bpf_ids("prog")}
    assert not ids & {link.get("prog_id") for link in bpf_ids("link")}


def test_killed_process_leaves_nothing_attached():
    """Links are owned by fds: SIGKILL of the owner detaches and frees everything."""
    code = ("import json, time, netmon\n"
            "m = netmon.Monitor(capacity=1024).start()\n"
            "print(json.dumps(sorted(s['id'] for s in m.program_stats().values())), flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=child_env())
    ids = set(json.loads(p.stdout.readline()))
    assert ids and ids <= {p["id"] for p in bpf_ids("prog")}
    p.kill()
    p.wait()
    wait_progs_unloaded(ids)
    assert not ids & {p["id"] for p in bpf_ids("prog")}
    assert not ids & {link.get("prog_id") for link in bpf_ids("link")}


def test_privileges_dropped_after_attach_and_capture_goes_on():
    """In a child: attach, drop every capability and become nobody, still capture."""
    code = ("import json, socket, time, netmon\n"
            "m = netmon.Monitor(capacity=1 << 20, user='nobody').start()\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.connect(('127.0.0.1', 9))\n"
            "time.sleep(0.1)\n"
            "st = m.stats()\n"
            "import os\n"
            "print(json.dumps({'uid': os.getuid(), 'caps': st['capabilities'],\n"
            "                  'ok': m.health()[0],\n"
            "                  'mine': m.count(pid=os.getpid(), protocol='udp')}))\n"
            "m.stop()\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=child_env())
    got = json.loads(out.stdout)
    assert got == {"uid": 65534, "caps": [], "ok": True, "mine": 1}


def test_runs_with_only_cap_bpf_and_cap_perfmon():
    code = ("import ctypes, json, os, socket, time\n"
            "from netmon.privilege import _Header, _Data, held_capabilities\n"
            "data = (_Data * 2)()\n"
            "data[1].effective = data[1].permitted = (1 << 6) | (1 << 7)  # 38, 39\n"
            "assert ctypes.CDLL(None).capset(ctypes.byref(_Header(0x20080522, 0)), data) == 0\n"
            "caps = held_capabilities()\n"
            "import netmon\n"
            "with netmon.Monitor(capacity=1 << 20) as m:\n"
            "    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(('127.0.0.1', 9))\n"
            "    time.sleep(0.1)\n"
            "    print(json.dumps({'caps': caps, 'mine': m.count(pid=os.getpid()),\n"
            "                      'backend': m.backend}))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=child_env())
    # auto falls back to the syscall backend: cgroup programs would need CAP_NET_ADMIN
    assert json.loads(out.stdout) == {"caps": ["perfmon", "bpf"], "mine": 1,
                                      "backend": "syscall"}
