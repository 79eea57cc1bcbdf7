"""Naming workloads: cgroup paths -> unit, container, pod; runtime state -> names; pid ->
ppid and exe without ever giving a reused pid another process's identity. The kernel
tests make real cgroups under the cgroup2 root, named as each runtime names them, move a
child into each and connect; only the runtimes' state files are written by the test."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
from helpers import assert_error, call
from netmon._core import RESULTS

from netmon import Monitor
from netmon.host import cgroup2_root
from netmon.identity import Identity, Process, Workload, parse_cgroup_path
from netmon.testing import record
from netmon.web import make_app

HEX = "0123456789abcdef" * 4
UID = "8d2e3f4a-1b2c-4d5e-9f00-aabbccddeeff"
SLEEP = os.path.realpath(shutil.which("sleep"))


# ---- paths (no kernel) ----

@pytest.mark.parametrize("path, expect", [
    ("/system.slice/nginx.service", dict(unit="nginx.service")),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service",
     dict(unit="foo.service")),
    ("/user.slice/user-1000.slice/session-3.scope", dict(unit="session-3.scope")),
    (f"/system.slice/docker-{HEX}.scope",
     dict(unit=f"docker-{HEX}.scope", container_runtime="docker", container_id=HEX)),
    (f"/docker/{HEX}", dict(container_runtime="docker", container_id=HEX)),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
     f"{UID.replace('-', '_')}.slice/cri-containerd-{HEX}.scope",
     dict(unit=f"cri-containerd-{HEX}.scope", container_runtime="containerd",
          container_id=HEX, pod_uid=UID, pod_qos="burstable")),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{HEX}.scope",
     dict(unit=f"crio-{HEX}.scope", container_runtime="cri-o", container_id=HEX,
          pod_uid=UID, pod_qos="guaranteed")),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-conmon-{HEX}.scope",
     dict(unit=f"crio-conmon-{HEX}.scope", pod_uid=UID, pod_qos="guaranteed")),
    (f"/machine.slice/libpod-{HEX}.scope",
     dict(unit=f"libpod-{HEX}.scope", container_runtime="podman", container_id=HEX)),
    (f"/kubepods/besteffort/pod{UID}/{HEX}",
     dict(container_id=HEX, pod_uid=UID, pod_qos="besteffort")),
    (f"/kubepods/pod{UID}/{HEX}", dict(container_id=HEX, pod_uid=UID, pod_qos="guaranteed")),
    ("/", {}),
    ("/system.slice", {}),
])
def test_paths_name_units_containers_and_pods(path, expect):
    want = Workload(cgroup=path, **{k: expect.get(k) for k in Workload._fields
                                    if k != "cgroup"})
    assert parse_cgroup_path(path) == want


# ---- processes (no kernel): a fake /proc ----

def test_a_reused_pid_never_inherits_another_process_identity():
    procs = {}
    ident = Identity(None, read_process=lambda pid, known=None: procs.get(pid))
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    procs[42] = (100, 1, "/usr/bin/a")                   # A, started at tick 100
    ident.sweep(1, 1, [(42, 150 * tick)], [])
    del procs[42]                                         # A exits, pid 42 is free
    ident.sweep(2, 2, [(42, 160 * tick)], [])            # a record of 42 nobody saw alive
    procs[42] = (300, 7, "/usr/bin/b")                    # B gets pid 42
    ident.sweep(3, 3, [(42, 250 * tick)], [])            # record older than B: not B's
    ident.sweep(4, 5, [(42, 310 * tick)], [])
    assert [ident.process(42, s) for s in (1, 2, 3, 4, 5, 6)] == [
        Process(1, "/usr/bin/a"), Process(None, None), Process(None, None),
        Process(7, "/usr/bin/b"), Process(7, "/usr/bin/b"), Process(None, None)]
    # the ranges a filter hands the store: A's records only, B's only
    assert ident.process_ranges(lambda p: p.exe == "/usr/bin/a") == [(42, 1, 2)]
    assert ident.process_ranges(lambda p: p.ppid == 7) == [(42, 4, 2**64 - 1)]


def _counting_reads(ident):
    reads = []
    real = ident._read_process

    def read(pid, known=None):
        reads.append(pid)
        return real(pid, known)
    ident._read_process = read
    return reads


def test_a_live_process_is_read_once_then_watched_until_it_exits():
    ident = Identity(None)
    reads = _counting_reads(ident)
    child = subprocess.Popen(["sleep", "30"])
    try:
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        ident.sweep(1, 1, [(child.pid, now)], [])
        ident.sweep(2, 3, [(child.pid, now)], [])  # alive all along: nothing read
        assert reads == [child.pid]
        assert ident.process(child.pid, 3) == Process(os.getpid(), SLEEP)
    finally:
        child.kill()
        child.wait()
    ident.sweep(4, 4, [(child.pid, now)], [])  # exited: read again, and gone
    assert reads == [child.pid, child.pid]
    assert [ident.process(child.pid, s) for s in (3, 4)] == [
        Process(os.getpid(), SLEEP), Process(None, None)]
    ident.close()


def test_sweeps_of_one_process_runs_read_nothing_until_another_pid_comes():
    mon = Monitor(capacity=64)
    reads = _counting_reads(mon.identity)
    me = (os.getpid(), os.path.realpath(sys.executable))
    for _ in range(3):
        mon.inject(record(pid=me[0]))
    mon.sweep()
    for _ in range(3):
        mon.inject(record(pid=me[0]))
    mon.sweep()  # the same run of records: no read
    assert reads == [me[0]]
    other = subprocess.Popen(["sleep", "30"])
    try:
        mon.inject(record(pid=other.pid))
        mon.inject(record(pid=me[0]))
        mon.sweep()  # two runs more: both pids looked at (ours still watched: not read)
        assert reads == [me[0], other.pid]
        assert [(e.pid, e.ppid, e.exe) for e in mon.events()] == [
            (me[0], os.getppid(), me[1])] * 6 + [(other.pid, me[0], SLEEP),
                                                  (me[0], os.getppid(), me[1])]
        for _ in range(64 + 5):  # the same run, past the store's 64: 5 never swept
            mon.inject(record(pid=me[0]))
        mon.sweep()
        assert reads == [me[0], other.pid]
        assert mon.identity.stats()["records_unswept"] == 5
        assert {(e.ppid, e.exe) for e in mon.events()} == {(os.getppid(), me[1])}
    finally:
        other.kill()
        other.wait()
        mon.identity.close()


def test_ppid_and_exe_filters_select_by_process_range():
    mon = Monitor(capacity=64)
    mon.identity = Identity(None, read_process=lambda pid, known=None: {
        10: (1, 1, "/usr/bin/curl"), 11: (1, 10, "/usr/bin/wget")}.get(pid))
    for pid in (10, 11, 10, 12):
        mon.inject(record(pid=pid))
    assert [e.pid for e in mon.events(exe="curl")] == [10, 10]
    assert [e.pid for e in mon.events(exe="/usr/bin/wget")] == [11]
    assert [e.pid for e in mon.events(ppid=10)] == [11]
    assert mon.events(exe="nothing-like-it") == [] and mon.events(ppid=999) == []
    assert [(e.pid, e.exe, e.ppid) for e in mon.events()][-1] == (12, None, None)
    top, groups, matched = mon.top("exe")
    # ties: the group seen last first
    assert [(ev.exe, n) for ev, n, _ in top] == [("/usr/bin/curl", 2), (None, 1),
                                                ("/usr/bin/wget", 1)]
    assert (groups, matched) == (3, 4)


# ---- real cgroups, real connects ----

@pytest.fixture
def cgtree():
    """A parent cgroup of our own under the cgroup2 root; make(rel) creates rel under it.
    Every cgroup made is removed at the end, deepest first, once its processes exited."""
    root = cgroup2_root()
    base = os.path.join(root, f"netmon-ident-{uuid.uuid4().hex[:8]}")
    made = []

    def make(rel):
        path = base
        for part in [""] + rel.split("/"):
            path = os.path.join(path, part) if part else path
            if not os.path.isdir(path):
                os.mkdir(path)
                made.append(path)
        return path

    make.base, make.rel = base, "/" + os.path.relpath(base, root)
    try:
        yield make
    finally:
        for path in reversed(made):
            for _ in range(100):  # a child killed just now may take a moment to leave
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


@pytest.fixture
def state(tmp_path):
    """Runtime state roots in a temp directory; write(runtime, id, config) as the
    runtime would."""
    roots = {"containerd": [str(tmp_path / "containerd")],
             "docker": [str(tmp_path / "docker")],
             "cri-o": [str(tmp_path / "crio")], "podman": [str(tmp_path / "podman")]}

    def write(runtime, cid, config):
        d = {"containerd": tmp_path / "containerd" / "k8s.io" / cid,
             "docker": tmp_path / "docker" / cid}[runtime]
        d.mkdir(parents=True)
        name = "config.json" if runtime == "containerd" else "config.v2.json"
        (d / name).write_text(json.dumps(config))
    write.roots = roots
    yield write
    shutil.rmtree(tmp_path, ignore_errors=True)


class Child:
    """A process moved into `cgroup` before it runs, connecting to port once, then waiting
    for a line on stdin (so it is alive while the test looks at it)."""

    def __init__(self, cgroup, port, argv=None):
        def enter():
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write("0")
        argv = argv or [sys.executable, "-c",
                        "import socket, sys; s = socket.socket(); "
                        f"s.connect_ex(('127.0.0.1', {port})); print(flush=True); "
                        "sys.stdin.readline()"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=enter, text=True)
        self.pid = self.proc.pid
        self.proc.stdout.readline()  # connected

    def exit(self):
        self.proc.communicate("\n")


@pytest.fixture
def port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


def _cases(state):
    """(cgroup under our parent, the expected fields but cgroup), state files written."""
    d_id, c_id, p_id, f_id = (uuid.uuid4().hex * 2 for _ in range(4))
    unit = f"nm-{uuid.uuid4().hex[:6]}.service"
    state("docker", d_id, {"Name": "/web-1", "Config": {"Labels": {}}})
    state("containerd", c_id, {"annotations": {
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-name": "shop-7d9f",
        "io.kubernetes.cri.sandbox-namespace": "prod"}})
    state("docker", f_id, {"Name": "/k8s_side_batch-1_jobs_x_0", "Config": {"Labels": {
        "io.kubernetes.container.name": "side", "io.kubernetes.pod.name": "batch-1",
        "io.kubernetes.pod.namespace": "jobs"}}})
    none = dict.fromkeys(Workload._fields[1:])
    return [
        (f"system.slice/{unit}", {**none, "unit": unit}),
        (f"system.slice/docker-{d_id}.scope",
         {**none, "unit": f"docker-{d_id}.scope", "container_runtime": "docker",
          "container_id": d_id, "container_name": "web-1"}),
        (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
         f"{UID.replace('-', '_')}.slice/cri-containerd-{c_id}.scope",
         {**none, "unit": f"cri-containerd-{c_id}.scope", "container_runtime": "containerd",
          "container_id": c_id, "pod_uid": UID, "pod_qos": "burstable",
          "container_name": "app", "pod_name": "shop-7d9f", "pod_namespace": "prod"}),
        (f"machine.slice/libpod-{p_id}.scope",
         {**none, "unit": f"libpod-{p_id}.scope", "container_runtime": "podman",
          "container_id": p_id}),
        # the cgroupfs driver's path names no runtime: the state file found says docker
        (f"kubepods/besteffort/pod{UID}/{f_id}",
         {**none, "container_runtime": "docker", "container_id": f_id, "pod_uid": UID,
          "pod_qos": "besteffort", "container_name": "side", "pod_name": "batch-1",
          "pod_namespace": "jobs"}),
    ]


def _event_of(mon, pid, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = mon.events(pid=pid)
        if evs:
            return evs[0]
        time.sleep(0.01)
    raise AssertionError(f"no event from pid {pid}")


@pytest.mark.bpf
def test_every_runtime_naming_on_real_cgroups(cgtree, state, port):
    cases = _cases(state)
    exe = os.path.realpath(sys.executable)
    with Monitor(capacity=1 << 16, runtime_roots=state.roots) as mon:
        children = [(Child(cgtree(rel), port), rel, want) for rel, want in cases]
        try:
            for child, rel, want in children:
                ev = _event_of(mon, child.pid)
                got = {k: getattr(ev, k) for k in Workload._fields}
                assert got == {**want, "cgroup": f"{cgtree.rel}/{rel}"}
                assert (ev.ppid, ev.exe) == (os.getpid(), exe)
                assert ev.to_dict()["pod_name"] == want["pod_name"]
                assert ev.cgroup_id == os.stat(os.path.join(cgtree.base, rel)).st_ino
            _filters_and_top(mon, cgtree, children)
        finally:
            for child, _, _ in children:
                child.exit()


def _filters_and_top(mon, cgtree, children):
    everyone = sorted(c.pid for c, _, _ in children)
    mine = {"cgroup": cgtree.rel}  # only this test's cgroups

    def pids_of(**f):
        return sorted(e.pid for e in mon.events(**{**mine, **f}))

    unit = children[0][2]["unit"]
    d_id = children[1][2]["container_id"]
    assert pids_of() == everyone
    assert pids_of(unit=unit) == [children[0][0].pid]
    assert pids_of(container=d_id[:12]) == [children[1][0].pid]
    assert pids_of(container="web-1") == [children[1][0].pid]
    assert pids_of(container="app") == [children[2][0].pid]
    assert pids_of(pod="shop-7d9f") == [children[2][0].pid]
    assert pids_of(pod=UID) == sorted([children[2][0].pid, children[4][0].pid])
    assert pids_of(namespace="jobs") == [children[4][0].pid]
    assert pids_of(cgroup=f"{cgtree.rel}/machine.slice") == [children[3][0].pid]
    assert pids_of(cgroup=f"{cgtree.rel}/machine.slic") == []  # whole components only
    assert pids_of(ppid=os.getpid()) == everyone
    assert pids_of(exe=os.path.basename(os.path.realpath(sys.executable))) == everyone
    for f in ({"unit": "no-such.service"}, {"container": "no-such"}, {"pod": "no-such"},
              {"namespace": "no-such"}, {"ppid": 1}, {"exe": "/no/such"}):
        assert mon.events(**mine, **f) == [] and mon.count(**mine, **f) == 0
    assert mon.events(cgroup="/no/such") == []
    assert mon.top("unit", cgroup="/no/such")[0] == []
    by = {b: {_key(b, ev): (n, failed) for ev, n, failed in mon.top(b, 0, **mine)[0]}
          for b in ("unit", "container", "pod", "namespace", "exe")}
    assert by["unit"] == {w["unit"]: (1, 0) for _, _, w in children if w["unit"]} | {
        None: (1, 0)}  # the cgroupfs driver's container is in no unit
    assert by["container"] == {w["container_id"]: (1, 0) for _, _, w in children
                               if w["container_id"]} | {None: (1, 0)}
    assert by["pod"] == {UID: (2, 0), None: (3, 0)}
    assert by["namespace"] == {"prod": (1, 0), "jobs": (1, 0), None: (3, 0)}
    assert by["exe"] == {os.path.realpath(sys.executable): (5, 0)}


def _key(by, ev):
    return {"unit": ev.unit, "container": ev.container_id, "pod": ev.pod_uid,
            "namespace": ev.pod_namespace, "exe": ev.exe}[by]


@pytest.mark.bpf
def test_a_removed_cgroup_keeps_its_names(cgtree, state, port):
    cid = uuid.uuid4().hex * 2
    state("docker", cid, {"Name": "/gone", "Config": {}})
    with Monitor(capacity=1 << 16, runtime_roots=state.roots) as mon:
        path = cgtree(f"system.slice/docker-{cid}.scope")
        child = Child(path, port)
        child.exit()  # connected and gone before anything asked about it
        time.sleep(0.2)  # the background sweep names it meanwhile
        os.rmdir(path)
        assert not os.path.exists(path)
        ev = _event_of(mon, child.pid)
        assert (ev.cgroup, ev.container_id, ev.container_name, ev.unit) == (
            f"{cgtree.rel}/system.slice/docker-{cid}.scope", cid, "gone",
            f"docker-{cid}.scope")
        assert [e.pid for e in mon.events(container="gone")] == [child.pid]


def _spawn_with_pid(pid, argv):
    """argv started as `pid` (ns_last_pid; other processes fork too, so retried)."""
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        if proc.pid == pid:
            return proc
        proc.communicate("\n")
    pytest.fail(f"could not get pid {pid} again")


@pytest.mark.bpf
def test_a_reused_pid_gets_the_new_process_identity(port):
    py = [sys.executable, "-c", "import socket, sys; s = socket.socket(); "
          f"s.connect_ex(('127.0.0.1', {port})); print(flush=True); sys.stdin.readline()"]
    sh = shutil.which("bash")
    with Monitor(capacity=1 << 16) as mon:
        first = subprocess.Popen(py, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first.stdout.readline()
        a = _event_of(mon, first.pid)
        first.communicate("\n")
        second = _spawn_with_pid(first.pid, [sh, "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}; "
                                             "echo; read x"])
        second.stdout.readline()
        # only the connects to `port`: bash's resolver may connect elsewhere first
        # (nscd's socket, a UDP route probe), depending on the machine's nsswitch
        deadline = time.monotonic() + 2
        while len(mon.events(pid=first.pid, port=port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        evs = mon.events(pid=first.pid, port=port)
        second.communicate("\n")
    # the first process's connect keeps its identity; every later one (normally one:
    # the assertion says what else there was) is the new process's
    detail = [(e.seq, e.kind, e.exe, e.destination) for e in evs]
    assert len(evs) >= 2, detail
    assert (evs[0].seq, evs[0].exe) == (a.seq, os.path.realpath(sys.executable)), detail
    assert {e.exe for e in evs[1:]} == {os.path.realpath(sh)}, detail
    assert {e.ppid for e in evs} == {os.getpid()}, detail
    assert [e.seq for e in mon.events(pid=first.pid, port=port, exe="bash")] == [
        e.seq for e in evs[1:]]


# ---- the API (no kernel) ----

def test_api_filters_top_and_fields_by_name():
    mon = Monitor(capacity=64)
    mon.identity = Identity(None, read_process=lambda pid, known=None: {
        10: (1, 1, "/usr/bin/curl")}.get(pid))
    mon.identity._cgroups[77] = parse_cgroup_path("/system.slice/nginx.service")
    mon.inject(record(pid=10, cgroup_id=77, ret=-111))
    mon.inject(record(pid=11, cgroup_id=78))
    app = make_app(mon)
    r = call(app, "GET", "/api/events", query="unit=nginx.service")
    assert r.status == 200 and [e["pid"] for e in r.body["events"]] == [10]
    ev = r.body["events"][0]
    assert (ev["cgroup"], ev["unit"], ev["exe"], ev["ppid"], ev["container_id"]) == (
        "/system.slice/nginx.service", "nginx.service", "/usr/bin/curl", 1, None)
    assert r.body["filters"]["unit"] == "nginx.service"
    for q in ("unit=other.service", "container=abc", "pod=p", "namespace=n",
              "cgroup=/user.slice", "ppid=4", "exe=wget"):
        r = call(app, "GET", "/api/events", query=q)
        assert (r.status, r.body["events"], r.body["matched"]) == (200, [], 0), q
    r = call(app, "GET", "/api/top", query="by=unit")
    assert [(t["unit"], t["count"], t["failed"]) for t in r.body["top"]] == [
        (None, 1, 0), ("nginx.service", 1, 1)] and r.body["groups"] == 2
    r = call(app, "GET", "/api/top", query="by=exe&exe=curl")
    assert [(t["exe"], t["count"]) for t in r.body["top"]] == [("/usr/bin/curl", 1)]
    assert_error(call(app, "GET", "/api/events", query="ppid=x"), 400, "Bad Request",
                 "ppid: must be an integer between 0 and 4294967295")
    assert_error(call(app, "GET", "/api/events", query="cgroup=system.slice"), 400,
                 "Bad Request")
    r = call(app, "GET", "/api/list-connections")
    assert r.body["connections"]["10"][0]["unit"] == "nginx.service"


def test_event_names_fields_in_identity_order():
    from netmon.event import NAME_FIELDS, Event
    assert NAME_FIELDS == Workload._fields + Process._fields
    row = (1, 5, 1, 2, 3, 4, 0, 2, 80, 1, 6, 0, b"c", b"\x7f\0\0\1", 1, 1, 0, 0, 0, 0,
           next(iter(RESULTS)), 0, b"")
    ev = Event.from_row(row, 0, tuple(range(len(NAME_FIELDS))))
    assert ev.cgroup == 0 and ev.exe == len(NAME_FIELDS) - 1 and ev.destination == "127.0.0.1:80"
    assert ev.result == RESULTS[row[20]] and ev.source_port is None
    assert Event.from_row(row, 0).exe is None
