"""The systemd unit netmon ships: systemd's own checks on it (security exposure, verify),
and netmon run the way the unit runs it, as far as that can be done without systemd as
PID 1: an unprivileged uid holding only the unit's ambient capabilities, no_new_privs,
MemoryDenyWriteExecute (PR_SET_MDWE), a real capture, and every system call it made
inside the unit's SystemCallFilter= (strace). The watchdog pings come from the poll loop's
health."""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import child_env, free_port, http, netmon_command, run_child, start

import netmon

UNIT = Path(netmon.__file__).parent / "data" / "netmon.service"
DYNAMIC_UID = 61184  # the first uid systemd's DynamicUser= hands out
MAX_EXPOSURE = 2.5


def directives(name):
    """Every value the unit gives `name`, in order."""
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(name + "=")]


def test_unit_exposure_is_low():
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                          str(UNIT)], capture_output=True, text=True).stdout
    score = float(re.search(r"Overall exposure level for netmon.service: ([0-9.]+)", out)[1])
    assert score <= MAX_EXPOSURE, out


def test_unit_verifies_clean(tmp_path):
    # the unit as shipped, but ExecStart= naming the netmon this test run installed
    unit = tmp_path / "netmon.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/local/bin/netmon",
                                             f"ExecStart={netmon_command()[0]}"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_unit_runs_unprivileged_with_only_the_needed_capabilities():
    assert directives("DynamicUser") == ["yes"] and not directives("User")
    caps = directives("AmbientCapabilities")
    assert caps == directives("CapabilityBoundingSet") == [
        "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_DAC_READ_SEARCH"]
    assert directives("NoNewPrivileges") == ["yes"] and directives("WatchdogSec") == ["30s"]
    assert directives("NotifyAccess") == ["all"]  # the single binary's netmon is a child


def expand_syscall_filter(items):
    """systemd's names (@groups, nested, and plain calls) -> the set of system calls."""
    calls = set()
    for item in items:
        if not item.startswith("@"):
            calls.add(item)
            continue
        out = subprocess.run(["systemd-analyze", "syscall-filter", item], check=True,
                             capture_output=True, text=True).stdout
        body = [ln.strip() for ln in out.splitlines()[1:]
                if ln.strip() and not ln.strip().startswith("#")]
        calls |= expand_syscall_filter(body)
    return calls


def _unit_user_command(argv, tmp_path, trace):
    """argv run as the unit runs it: DYNAMIC_UID with only the unit's capabilities
    (ambient, inheritable, bounding), no_new_privs, MDWE; traced by strace. Python may
    live under a home that only root can enter (pyenv in /root): a private mount
    namespace shows that one directory to the unprivileged user, nothing else changes."""
    caps = ",".join("+" + c[len("CAP_"):].lower()
                    for c in directives("AmbientCapabilities")[0].split())
    mdwe = ("import ctypes, os, sys\n"
            "if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit('PR_SET_MDWE failed')\n"
            "os.execv(sys.argv[1], sys.argv[1:])")
    setpriv = ["setpriv", f"--reuid={DYNAMIC_UID}", f"--regid={DYNAMIC_UID}", "--clear-groups",
               f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}",
               f"--bounding-set=-all,{caps}", "--no-new-privs", "--",
               sys.executable, "-c", mdwe, *argv]
    strace = ["strace", "-f", "-qq", "-o", str(trace), "--"]
    script, path = ["set -e"], Path(os.path.realpath(sys.executable))
    for parent in reversed(path.parents):
        if parent != Path("/") and not parent.stat().st_mode & 0o001:  # no search for others
            child = path.relative_to(parent).parts[0]
            shown = tmp_path / "shown"
            (shown / child).mkdir(parents=True)
            shown.chmod(0o755)
            script += [f"mount --bind '{parent / child}' '{shown / child}'",
                       f"mount --rbind '{shown}' '{parent}'"]
            break
    script.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script),
            "sh", *strace, *setpriv]


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"^PPid:\s+(\d+)", f.read(), re.M)[1])
    except (OSError, TypeError):
        return 0


def _descendant_with_uid(pid, uid):
    """The process below `pid` running as `uid` (netmon, under strace and setpriv)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            if not re.search(rf"^Uid:\s+{uid}\s", text, re.M):
                continue
            ancestor = int(status.parent.name)
            while ancestor > 1 and ancestor != pid:
                ancestor = _ppid(ancestor)
            if ancestor == pid:
                return int(status.parent.name)
        time.sleep(0.05)
    raise AssertionError("netmon as the unit's user not found")


def _syscalls_after_exec(trace, script):
    """The system calls netmon made: those after the execve of its script."""
    names, started = set(), False
    for line in trace.read_text().splitlines():
        if not started:
            started = f'execve("{script}"' in line and line.rstrip().endswith("= 0")
            continue
        m = re.match(r"\d+\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
        if m and not line.split(None, 1)[1].startswith(("+++", "---")):
            names.add(m[1])
    assert started, "netmon's execve not traced"
    return names


@pytest.mark.bpf
@pytest.mark.parametrize("backend", ["cgroup", "syscall"])
def test_capture_under_the_units_restrictions(backend, tmp_path, cgroup):
    # scoped to a cgroup of the test's own: strace slows every system call netmon makes,
    # and the host's other connects (other test runs, benchmarks) must not reach it
    port, trace = free_port(), tmp_path / "trace"
    argv = netmon_command() + ["--addr", f"127.0.0.1:{port}", "--backend", backend,
                               "--capacity", "4096", "--cgroup", str(cgroup)]
    env = {k: v for k, v in child_env().items() if not k.startswith("NETMON_")}
    proc = subprocess.Popen(_unit_user_command(argv, tmp_path, trace), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        line = proc.stdout.readline()
        assert f"{backend} backend" in line, proc.stderr.read() if not line else line
        pid = _descendant_with_uid(proc.pid, DYNAMIC_UID)
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        assert re.search(r"^CapEff:\s+0+$", status, re.M)  # all dropped once attached
        base = f"http://127.0.0.1:{port}"
        assert http(base + "/health")[0] == 200
        dead = free_port()  # a real connect, refused, from a child in the cgroup
        child = run_child("nm-unit", [{"family": "inet", "addr": ["127.0.0.1", dead]}],
                          preexec_fn=cgroup.enter)["pid"]
        deadline, evs = time.monotonic() + 10, []
        while not evs and time.monotonic() < deadline:
            evs = http(f"{base}/api/events?pid={child}")[2]["events"]
            time.sleep(0.05)
        assert [(e["pid"], e["command"], e["destination"], e["protocol"], e["outcome"])
                for e in evs] == [(child, "nm-unit", f"127.0.0.1:{dead}", "TCP", "refused")]
        stats = http(base + "/api/stats")[2]
        assert (stats["capabilities"], stats["attached"]) == ([], True)
        os.kill(pid, 15)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:  # strace first, so that netmon is not left traced
            proc.kill()
            proc.wait()
            if pid is not None:
                os.kill(pid, 9)
    allowed = expand_syscall_filter(" ".join(directives("SystemCallFilter")).split())
    used = _syscalls_after_exec(trace, netmon_command()[0])
    assert "bpf" in used and used - allowed == set()


def test_watchdog_interval_follows_systemd(monkeypatch):
    from netmon import systemd
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))  # a launcher above netmon
    assert systemd.watchdog_interval() == 15.0
    unrelated = subprocess.Popen(["sleep", "5"])
    try:
        monkeypatch.setenv("WATCHDOG_PID", str(unrelated.pid))  # meant for another process
        assert systemd.watchdog_interval() is None
    finally:
        unrelated.kill()
        unrelated.wait()
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


@pytest.mark.bpf
def test_watchdog_pinged_while_healthy_and_not_after_the_poll_thread_fails(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    proc, addr, _ = start(env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                               "WATCHDOG_USEC": "200000",
                               "NETMON_TEST_POLL_FAILURE_AFTER": "1.0"})
    got = []
    while not got or got[-1][1] != b"STOPPING=1":
        got.append((time.monotonic(), sock.recv(100)))
    assert proc.wait(timeout=5) == 1
    (ready_at, first), last = got[0], got[-1][1]
    assert (first, last) == (b"READY=1", b"STOPPING=1")
    pings = [t for t, msg in got[1:-1] if msg == b"WATCHDOG=1"]
    assert len(pings) == len(got) - 2  # nothing else between
    # every 0.1 s while healthy; the poll thread fails 1 s after start, and no ping later
    # than the loop's next turn after that
    assert len(pings) >= 4 and max(pings) < ready_at + 1.0 + 0.5, got
