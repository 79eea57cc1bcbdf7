"""`netmon trace`: filters checked before anything loads, aligned columns, and (root) the
real command capturing real connects, stopping on --count or SIGTERM with a summary."""
import json
import signal
import socket
import subprocess

import pytest
from helpers import child_env, netmon_command, run_child

from netmon import cli
from netmon.cli import trace
from netmon.event import Event
from netmon.host import cgroup2_root
from netmon.identity import parse_cgroup_path
from netmon.testing import record, synthetic_monitor


@pytest.mark.parametrize("argv, param", [
    (["--pid", "x"], "pid"), (["--port", "70000"], "port"), (["--dest", "10.0.0.0/40"], "dest"),
    (["--result", "EWHAT"], "result"), (["--family", "ipx"], "family"),
    (["--kind", "tcp"], "kind"), (["--command", "a-much-too-long-name"], "command"),
])
def test_bad_filter_is_one_line_and_exit_2(capsys, argv, param):
    assert cli.main(["trace"] + argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"netmon trace: error: {param}: ")


def test_bad_flag_is_one_line_and_exit_2(capsys):
    assert trace.main(["--count", "many"]) == 2
    assert capsys.readouterr().err.startswith("netmon trace: error: argument --count")


def test_serve_is_the_explicit_form_of_the_default(capsys):
    assert cli.main(["serve", "--addr", "nowhere"]) == 2
    explicit = capsys.readouterr().err
    assert cli.main(["--addr", "nowhere"]) == 2
    assert capsys.readouterr().err == explicit and "invalid address" in explicit


def test_columns_line_up():
    mon = synthetic_monitor()
    mon.inject(record(pid=4242, comm="curl", ip="10.1.2.3", port=443, ret=-111, outcome=3,
                      latency_us=1234))
    mon.inject(record(pid=7, comm="busctl", path="/run/dbus/system_bus_socket"))
    mon.inject(record(pid=123456, comm="dig", ip="::1", port=53, sock_type=2, kind=2,
                      packets=3))
    lines = [trace.HEADER] + [trace.line(e) for e in mon.events(kind=None)]
    ends = [trace.HEADER.index(w) + len(w) for w in ("PID", "LATENCY")]  # right-aligned
    root = "/" if cgroup2_root() else "-"  # cgroup id 1: the root cgroup, where mounted
    starts = [trace.HEADER.index(w) for w in ("COMMAND", "FAMILY", "SOURCE", "DESTINATION",
                                              "PROTO", "RESULT", "WORKLOAD")]
    for ln in lines[1:]:
        assert all(ln[end - 1] != " " and ln[end] == " " for end in ends), ln
        assert all(ln[c - 1] == " " and ln[c] != " " for c in starts), ln
    assert lines[1].split() == [lines[1].split()[0], "4242", "curl", "inet", "-",
                                "10.1.2.3:443", "TCP", "1.2ms", "ECONNREFUSED", root]
    assert lines[2].split()[1:] == ["7", "busctl", "unix", "-", "/run/dbus/system_bus_socket",
                                    "UNIX", "-", "ok", root]
    assert lines[3].split()[1:] == ["123456", "dig", "inet6", "-", "[::1]:53", "UDP", "-",
                                    "sent", "3", root]
    ev = Event.from_row(mon._store.query(1, True)[0][0], mon.wall_offset_ns())
    assert trace.line(ev).split()[0] == ev.timestamp.strftime("%H:%M:%S.%f")


@pytest.mark.parametrize("us, text", [(None, "-"), (1, "1us"), (999, "999us"),
                                      (1000, "1.0ms"), (999_949, "999.9ms"),
                                      (1_000_000, "1.00s"), (127_000_000, "127.00s")])
def test_latency_is_short(us, text):
    assert trace.latency(us) == text


def test_result_column_says_what_happened():
    """ok, the failure's errno (from connect() or the handshake), pending, unknown: the
    same words on both backends; EINPROGRESS shows only while the handshake runs."""
    mon = synthetic_monitor()
    for kw in [dict(ret=-115, outcome=1, sock_id=0xA0),  # non-blocking, then refused
               dict(ret=-115, outcome=1, sock_id=0xB0),  # non-blocking, then established
               dict(ret=-115, outcome=1, sock_id=0xC0),  # non-blocking, still pending
               dict(flags=0x4, outcome=1, backend=2, sock_id=0xD0),  # cgroup, blocking
               dict(ret=-2, path="/nowhere"),
               dict(flags=0x4, path="/x", backend=2)]:  # a cgroup hook: unknown
        mon.inject(record(**kw))
    mon.inject(record(kind=3, sock_id=0xA0, outcome=3, ret=-111, latency_us=40, pid=0))
    mon.inject(record(kind=3, sock_id=0xB0, outcome=2, latency_us=50, pid=0))
    mon.inject(record(kind=3, sock_id=0xD0, outcome=3, ret=-110, latency_us=3_000_000, pid=0))
    got = [trace.line(e).split()[-3:-1] for e in mon.events()]  # before WORKLOAD
    assert got == [["40us", "ECONNREFUSED"], ["50us", "ok"], ["-", "pending"],
                   ["3.00s", "ETIMEDOUT"], ["-", "ENOENT"], ["-", "unknown"]]


# ---- the real command (root) ----

def start_trace(*args):
    proc = subprocess.Popen(netmon_command() + ["trace", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    ready = proc.stderr.readline()  # printed once the programs are attached
    assert ready.startswith("netmon trace: watching"), ready + proc.stderr.read()
    return proc


def connect_from_child(comm, ops):
    return run_child(comm, ops)["pid"]


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.bpf
def test_json_count_captures_real_connects(listener):
    comm = "nm-trace-json"
    proc = start_trace("--json", "--count", "4", "--command", comm)
    try:
        connect_from_child("nm-trace-other", [{"family": "inet",
                                               "addr": ["127.0.0.1", listener]}])
        pid = connect_from_child(comm, [{"family": "inet", "addr": ["127.0.0.1", listener],
                                         "repeat": 4},
                                        {"family": "inet", "addr": ["127.0.0.1", listener]}])
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 4  # --count: the fifth connect is not printed
    for e in events:
        assert (e["pid"], e["command"], e["destination"], e["return_code"], e["kind"]) == \
            (pid, comm, f"127.0.0.1:{listener}", 0, "connect")
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})
    assert err.splitlines()[-1].startswith("netmon trace: 4 shown;")


def _own_workload():
    """The WORKLOAD column of a child of ours: our cgroup's unit, else its path."""
    with open("/proc/self/cgroup") as f:
        path = next(ln[3:].strip() for ln in f if ln.startswith("0::"))
    w = parse_cgroup_path(path)
    return w.unit or w.cgroup


@pytest.mark.bpf
def test_columns_until_sigterm(listener):
    proc = start_trace("--port", str(listener), "--result", "ok")
    try:
        assert proc.stdout.readline().split() == ["TIME(UTC)", "PID", "COMMAND", "FAMILY",
                                                  "SOURCE", "DESTINATION", "PROTO", "LATENCY",
                                                  "RESULT", "WORKLOAD"]
        pid = connect_from_child("nm-trace-cols", [{"family": "inet",
                                                    "addr": ["127.0.0.1", listener],
                                                    "repeat": 2}])
        lines = [proc.stdout.readline().split() for _ in range(2)]  # flushed per line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    for fields in lines:
        assert fields[1:4] + fields[5:7] + fields[8:] == [str(pid), "nm-trace-cols", "inet",
                                                          f"127.0.0.1:{listener}", "TCP", "ok",
                                                          _own_workload()]
        assert fields[4].startswith("127.0.0.1:") and int(fields[4].split(":")[1]) > 0
        assert fields[7].endswith(("us", "ms"))  # the handshake's latency
    assert proc.returncode == 0 and out == ""
    assert err.splitlines()[-1].startswith("netmon trace: 2 shown; the kernel saw ")


@pytest.mark.bpf
@pytest.mark.parametrize("backend", ["syscall", "cgroup"])
def test_curl_to_a_closed_port_shows_the_refusal(backend):
    """curl connects non-blocking (EINPROGRESS): its line waits for the handshake and says
    what happened, with the handshake's latency; --json carries the final fields."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = closed.getsockname()[1]
        text = start_trace("--backend", backend, "--port", str(port), "--count", "1")
        js = start_trace("--backend", backend, "--port", str(port), "--count", "1", "--json")
        try:
            subprocess.run(["curl", "-s", "-m", "2", f"http://127.0.0.1:{port}/"])
            out, err = text.communicate(timeout=30)
            jout, jerr = js.communicate(timeout=30)
        finally:
            text.kill()
            js.kill()
    header, line = out.splitlines()
    fields = line.split()
    assert fields[2:4] + fields[5:7] + fields[8:] == ["curl", "inet", f"127.0.0.1:{port}",
                                                      "TCP", "ECONNREFUSED", _own_workload()]
    assert fields[4] == "-"  # a refused connect's port is released before we see it
    assert fields[7].endswith(("us", "ms"))
    ev = json.loads(jout)
    assert (ev["command"], ev["return_code"], ev["error"], ev["outcome"], ev["backend"]) == (
        "curl", -115, "ECONNREFUSED", "refused", backend)
    assert ev["latency_us"] > 0
    assert "0 shown still pending" in err.splitlines()[-1]
