"""Plain helpers the test modules share (fixtures live in conftest.py): in-process WSGI
calls, the `netmon` command as a subprocess, the connector child, bpftool listings."""
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

CONNECTOR = Path(__file__).with_name("connector.py")


# ---- the app in process (WSGI) ----

class Reply(NamedTuple):
    status: int
    headers: dict
    body: dict


def call(app, method, path, body=None, *, query="", headers=None) -> Reply:
    """One request through the WSGI interface. body: a dict/list (sent as JSON) or bytes."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(data),
               "wsgi.errors": io.StringIO(), "CONTENT_LENGTH": str(len(data))}
    environ.update(headers or {})
    started = {}

    def start_response(status, response_headers, exc_info=None):
        started["status"] = int(status.split()[0])
        started["headers"] = dict(response_headers)

    raw = b"".join(app(environ, start_response))
    assert started["headers"]["Content-Type"] == "application/json"
    return Reply(started["status"], started["headers"], json.loads(raw))


def assert_error(reply, status, reason, message=None):
    assert reply.status == status
    assert set(reply.body) == {"error", "message"}
    assert reply.body["error"] == reason
    assert reply.body["message"]
    if message is not None:
        assert reply.body["message"] == message


class Healthy:
    """A synthetic monitor reporting the health it is given (it has no kernel side)."""

    def __init__(self, monitor, health=(True, None)):
        self._monitor, self._health = monitor, health

    def health(self):
        return self._health

    def __getattr__(self, name):
        return getattr(self._monitor, name)


# ---- the netmon command (root for anything that captures) ----

def child_env(extra=None):
    """The environment for a child Python: it imports the netmon this test run imports."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(extra or {})}


def netmon_command():
    script = Path(sys.executable).with_name("netmon")
    return [str(script)] if script.exists() else [sys.executable, "-m", "netmon"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_netmon(*args, env=None):
    """`netmon` on a free loopback port, NETMON_* cleared: (process, port, startup line).
    The line is printed once the programs are attached."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NETMON_")}
    proc = subprocess.Popen(netmon_command() + ["--addr", f"127.0.0.1:{port}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**clean, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})})
    line = proc.stdout.readline()
    assert line, f"netmon did not start: {proc.stderr.read()}"
    return proc, port, line.strip()


def start(*args, env=None):
    """A running netmon: (process, host:port, startup line)."""
    proc, port, line = start_netmon(*args, env=env)
    return proc, f"127.0.0.1:{port}", line


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=5)


def http(url, body=None, method=None, headers=None):
    """(status, headers, parsed JSON) for one request; HTTP errors are answers too."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, head, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, e.headers, e.read()
    assert head["Content-Type"] == "application/json"
    return status, head, json.loads(raw)


# ---- real connects from a child, and what the kernel holds ----

def run_child(comm, ops, preexec_fn=None):
    """connector.py named `comm` making `ops`: its {"pid", "results"}."""
    out = subprocess.run([sys.executable, str(CONNECTOR), comm, json.dumps(ops)], check=True,
                         capture_output=True, text=True, preexec_fn=preexec_fn).stdout
    return json.loads(out)


def wait_for(mon, pid, n, timeout=2.0):
    """The pid's events once there are n of them (or whatever arrived by the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        evs = mon.events(pid=pid)
        if len(evs) >= n or time.monotonic() > deadline:
            return evs
        time.sleep(0.01)


def bpf_ids(kind):
    """`bpftool -j <kind> list`: every BPF object of that kind (prog, link) on the host."""
    return json.loads(subprocess.run(["bpftool", "-j", kind, "list"], check=True,
                                     capture_output=True, text=True).stdout or "[]")


def wait_progs_unloaded(ids, timeout=5.0):
    """Until none of these BPF program ids is loaded (the kernel frees them after their
    last holder exits), or the timeout."""
    deadline = time.monotonic() + timeout
    while ids & {p["id"] for p in bpf_ids("prog")} and time.monotonic() < deadline:
        time.sleep(0.05)


def prog_ids_held_by(pid):
    """The BPF program ids a process holds open (program and link fds both name them)."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except FileNotFoundError:  # a connection's fd, closed since the listing
            continue
        m = re.search(r"^prog_id:\s*(\d+)$", text, re.M)
        if m:
            ids.add(int(m.group(1)))
    return ids


# ---- /metrics ----

def scrape_app(app) -> str:
    started = {}

    def start_response(status, headers, exc_info=None):
        started.update(status=status, headers=dict(headers))

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors":
               io.StringIO()}
    body = b"".join(app(environ, start_response)).decode()
    assert started["status"].startswith("200")
    assert started["headers"]["Content-Type"].startswith("text/plain; version=0.0.4")
    return body


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} via prometheus_client's parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}
