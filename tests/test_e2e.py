"""End to end: the installed `netmon` command on an ephemeral loopback port, real connects
from a child with a known comm, questions over HTTP as curl would ask them, then SIGTERM.
Needs root; the tests run in file order and the last one stops the server."""
import os
import signal
import socket
import tempfile
import time

import pytest
from helpers import bpf_ids, http, prog_ids_held_by, run_child, start_netmon

import netmon

pytestmark = pytest.mark.bpf
COMM = "nm-e2e-child"


@pytest.fixture(scope="module")
def server():
    # the syscall backend: these tests check its exact return codes
    proc, port, line = start_netmon("--capacity", "1048576", "--backend", "syscall")
    try:
        yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "line": line}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def child(server):
    """A child named COMM that made one connect of each kind; its events reached the API."""
    tmp = tempfile.mkdtemp()
    tcp4, tcp6, unix, closed, udp = (socket.socket(), socket.socket(socket.AF_INET6),
                                     socket.socket(socket.AF_UNIX), socket.socket(),
                                     socket.socket(type=socket.SOCK_DGRAM))
    tcp4.bind(("127.0.0.1", 0))
    tcp6.bind(("::1", 0))
    path = os.path.join(tmp, "e2e.sock")
    unix.bind(path)
    for s in (tcp4, tcp6, unix):
        s.listen()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    udp.bind(("127.0.0.1", 0))
    ports = {"tcp4": tcp4.getsockname()[1], "tcp6": tcp6.getsockname()[1],
             "closed": closed.getsockname()[1], "udp": udp.getsockname()[1], "path": path}
    ops = [{"family": "inet", "addr": ["127.0.0.1", ports["tcp4"]]},
           {"family": "inet6", "addr": ["::1", ports["tcp6"]]},
           {"family": "unix", "addr": path},
           {"family": "inet", "addr": ["127.0.0.1", ports["closed"]]},
           {"family": "inet", "type": "dgram", "addr": ["127.0.0.1", ports["udp"]]}]
    result = run_child(COMM, ops)
    for s in (tcp4, tcp6, unix, closed, udp):
        s.close()
    deadline = time.monotonic() + 10  # the poll loop delivers within tens of ms
    while time.monotonic() < deadline:
        _, _, body = http(server["url"] + "/api/connection-summary",
                          {"pid": result["pid"], "duration": 60})
        if body["total_attempts"] >= len(ops):
            break
        time.sleep(0.05)
    return {**result, **ports}


def test_startup_line(server):
    line = server["line"]
    assert line.startswith(f"netmon {netmon.__version__} listening on {server['url']}")
    assert "netmon_connect_enter" in line and "netmon_connect_exit" in line
    assert "1048576 events" in line


def test_health_on_the_real_kernel(server):
    status, _, body = http(server["url"] + "/health")
    assert status == 200
    assert body["status"] == "healthy" and body["service"] == "netmon"
    assert body["version"] == netmon.__version__
    assert body["events_dropped"] == 0 and body["events_captured"] >= 0
    assert "reason" not in body


def test_index(server):
    status, _, body = http(server["url"] + "/")
    assert status == 200 and "POST /api/connection-summary" in body["endpoints"]


def test_summary_counts_the_childs_connects(server, child):
    url = server["url"] + "/api/connection-summary"
    status, _, body = http(url, {"pid": child["pid"], "duration": 60})
    assert status == 200
    assert body == {"total_attempts": 5, "pid": child["pid"], "command": None, "duration": 60,
                    "message": f"Found 5 connection attempts from PID {child['pid']} "
                               "over 60 seconds"}
    status, _, body = http(url, {"command": COMM, "duration": 60})
    assert (status, body["total_attempts"]) == (200, 5)
    assert body["message"] == f"Found 5 connection attempts from command '{COMM}' over 60 seconds"


def test_list_shows_each_connect_with_its_fields(server, child):
    status, _, body = http(server["url"] + f"/api/list-connections?pid={child['pid']}")
    assert status == 200
    assert body["total_pids"] == 1 and body["truncated"] is False
    assert body["message"] == "Found 5 total connections across 1 processes"
    events = body["connections"][str(child["pid"])]
    got = [(e["destination"], e["address_family"], e["protocol"], e["socket_type"],
            e["return_code"], e["error"]) for e in events]
    assert got == [
        (f"127.0.0.1:{child['tcp4']}", 2, "TCP", "STREAM", 0, None),
        (f"[::1]:{child['tcp6']}", 10, "TCP", "STREAM", 0, None),
        (child["path"], 1, "UNIX", "STREAM", 0, None),
        (f"127.0.0.1:{child['closed']}", 2, "TCP", "STREAM", -111, "ECONNREFUSED"),
        (f"127.0.0.1:{child['udp']}", 2, "UDP", "DGRAM", 0, None),
    ]
    tids = {r["tid"] for r in child["results"]}
    for e in events:
        assert (e["pid"], e["command"], e["uid"]) == (child["pid"], COMM, os.geteuid())
        assert e["tid"] in tids
    assert events[0]["destination_ip"] == "127.0.0.1"
    assert events[0]["destination_port"] == child["tcp4"]
    assert events[1]["destination_ip"] == "::1"


def test_list_limit_over_http(server, child):
    status, _, body = http(server["url"] + "/api/list-connections",
                           {"pid": child["pid"], "limit": 2}, method="POST")
    assert status == 200 and body["truncated"] is True
    assert [e["error"] for e in body["connections"][str(child["pid"])]] == ["ECONNREFUSED", None]


def test_server_limits_answer_json(server):
    url = server["url"] + "/api/connection-summary"
    status, _, body = http(url, b"{" + b" " * 20000 + b"}", method="POST")
    assert (status, body["error"]) == (413, "Request Entity Too Large")
    status, _, body = http(server["url"] + "/health", headers={"X-Big": "a" * 20000})
    assert (status, body["error"]) == (413, "Request Entity Too Large")
    status, head, body = http(url)
    assert (status, head["Allow"]) == (405, "POST")
    status, _, body = http(url, b"not json", method="POST")
    assert (status, body["message"]) == (400, "invalid JSON request body")
    assert http(server["url"] + "/nope")[0] == 404


def test_sigterm_exits_0_and_detaches_everything(server):
    """Last: stops the server."""
    proc = server["proc"]
    ids = prog_ids_held_by(proc.pid)
    names = {p["id"]: p.get("name", "") for p in bpf_ids("prog")}
    assert len(ids) >= 2 and all(names[i].startswith("netmon_") for i in ids)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert "Traceback" not in proc.stderr.read()
    assert not ids & {p["id"] for p in bpf_ids("prog")}
    assert not ids & {link.get("prog_id") for link in bpf_ids("link")}
