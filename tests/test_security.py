"""Access control, least privilege and fault handling."""
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest
from helpers import (
    bpf_ids,
    child_env,
    http,
    netmon_command,
    prog_ids_held_by,
    start,
    stop,
    wait_progs_unloaded,
)

from netmon.testing import record, synthetic_monitor
from netmon.web import make_app
from netmon.web.guard import Guard, SecurityError, is_loopback, read_token

TOKEN = "s3cret-token-0123456789abcdef"


def call(app, path="/health", method="GET", headers=None):
    """(status, headers dict, body) for one in-process WSGI request."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "wsgi.url_scheme": "http",
               "wsgi.input": __import__("io").BytesIO(b""), "CONTENT_LENGTH": "0",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1:8080"}
    for k, v in (headers or {}).items():
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    got = {}

    def start_response(status, head, exc_info=None):
        got["status"], got["headers"] = int(status[:3]), dict(head)

    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


@pytest.fixture
def guarded():
    m = synthetic_monitor(64)
    m.inject(record(pid=7))
    guard = Guard(None, token=TOKEN, check_host=True, cors_origins=["https://ok.example"])
    guard.app = make_app(m, server_stats=guard.stats)
    return guard


def test_token_required_everywhere_but_health(guarded):
    assert call(guarded, "/health")[0] in (200, 503)  # open: liveness probes carry no token
    status, head, body = call(guarded, "/api/list-connections")
    assert status == 401 and head["WWW-Authenticate"].startswith("Bearer")
    assert head["Content-Type"] == "application/json"
    assert json.loads(body)["error"] == "Unauthorized"
    for bad in ("Bearer wrong", "Basic " + TOKEN, TOKEN, "Bearer " + TOKEN + "x", "Bearer"):
        assert call(guarded, "/api/list-connections", headers={"Authorization": bad})[0] == 401
    ok = call(guarded, "/api/list-connections", headers={"Authorization": "Bearer " + TOKEN})
    assert ok[0] == 200 and json.loads(ok[2])["total_pids"] == 1
    assert guarded.stats()["auth_failures"] == 6


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:8080", True), ("localhost:8080", True), ("[::1]:8080", True),
    ("localhost", True), ("127.5.5.5", True),
    ("evil.example:8080", False), ("10.0.0.1:8080", False), ("[2001:db8::1]:80", False),
    ("localhost.evil.example", False),
])
def test_host_header_checked_on_loopback(host, allowed):
    guard = Guard(make_app(synthetic_monitor(4)), check_host=True)
    status, head, body = call(guard, "/", headers={"Host": host})
    assert (status != 403) == allowed
    if not allowed:
        assert "DNS rebinding" in json.loads(body)["message"]
        assert guard.stats()["host_rejected"] == 1


def test_cors_only_for_listed_origins(guarded):
    auth = {"Authorization": "Bearer " + TOKEN}
    _, head, _ = call(guarded, "/", headers=auth)
    assert not any(h.startswith("Access-Control") for h in head)
    _, head, _ = call(guarded, "/", headers={**auth, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in head
    _, head, _ = call(guarded, "/", headers={**auth, "Origin": "https://ok.example"})
    assert head["Access-Control-Allow-Origin"] == "https://ok.example"
    status, head, _ = call(guarded, "/api/events", method="OPTIONS", headers={
        "Origin": "https://ok.example", "Access-Control-Request-Method": "GET"})
    assert status == 204 and "Authorization" in head["Access-Control-Allow-Headers"]


def test_token_file_rules(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        read_token(str(f))
    f.chmod(0o600)
    assert read_token(str(f)) == TOKEN
    f.write_text("short")
    with pytest.raises(SecurityError, match="shorter"):
        read_token(str(f))
    with pytest.raises(SecurityError, match="cannot read"):
        read_token(str(tmp_path / "missing"))


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "::1", "localhost", "[::1]", "127.1.2.3"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))


def run_cli(*args, env=None):
    return subprocess.run(netmon_command() + list(args), capture_output=True, text=True,
                          env=child_env(env), timeout=30)


def test_remote_bind_needs_a_token_or_an_explicit_risk(tmp_path):
    r = run_cli("--addr", ":0")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "--auth-token-file" in line and "--allow-unauthenticated-remote" in line
    f = tmp_path / "token"
    f.write_text(TOKEN)
    f.chmod(0o640)
    r = run_cli("--addr", ":0", "--auth-token-file", str(f))
    assert r.returncode == 2 and "chmod 600" in r.stderr
    r = run_cli("--addr", "127.0.0.1:0", "--tls-cert", str(f))
    assert r.returncode == 2 and "--tls-key" in r.stderr


# ---- with the real kernel ----

@pytest.mark.bpf
def test_token_tls_and_dropped_capabilities_end_to_end(tmp_path):
    tok = tmp_path / "token"
    tok.write_text(TOKEN)
    tok.chmod(0o600)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    proc, addr, line = start("--auth-token-file", str(tok), "--tls-cert", str(cert),
                             "--tls-key", str(key))
    try:
        assert f"https://{addr}" in line
        ctx = ssl.create_default_context(cafile=str(cert))

        def get(path, token=None):
            req = urllib.request.Request(f"https://{addr}{path}", headers={
                "Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        assert get("/health")[0] == 200
        assert get("/")[0] == 401
        status, _ = get("/", TOKEN)
        assert status == 200
        with open(f"/proc/{proc.pid}/status") as f:
            caps = {k: v for k, v in (line.split(":\t") for line in f if line.startswith("Cap"))}
        assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0
        for task in os.listdir(f"/proc/{proc.pid}/task"):  # every thread, HTTP workers too
            with open(f"/proc/{proc.pid}/task/{task}/status") as f:
                eff = next(line for line in f if line.startswith("CapEff"))
            assert int(eff.split()[1], 16) == 0, task
    finally:
        assert stop(proc) == 0


@pytest.mark.bpf
def test_kill_9_leaves_nothing_attached():
    proc, _, _ = start()
    ids = prog_ids_held_by(proc.pid)
    assert len(ids) == 5  # the default (auto) here: the cgroup backend (+ the TCP ones)
    proc.kill()
    proc.wait()
    wait_progs_unloaded(ids)
    assert not ids & {p["id"] for p in bpf_ids("prog")}
    assert not ids & {link.get("prog_id") for link in bpf_ids("link")}


@pytest.mark.bpf
def test_two_instances_capture_independently():
    a, addr_a, _ = start()
    b, addr_b, _ = start()
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", 9))
        s.close()
        me = {"pid": os.getpid(), "duration": 60}
        for addr in (addr_a, addr_b):
            deadline = time.monotonic() + 5
            while http(f"http://{addr}/api/connection-summary", me)[2]["total_attempts"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert prog_ids_held_by(a.pid).isdisjoint(prog_ids_held_by(b.pid))
    finally:
        assert stop(a) == 0 and stop(b) == 0


@pytest.mark.bpf
def test_poll_thread_failure_gives_503_and_exit_1():
    proc, addr, _ = start(env={"NETMON_TEST_POLL_FAILURE_AFTER": "0.3"})
    seen_503 = False
    while proc.poll() is None:
        try:
            status, _, body = http(f"http://{addr}/health")
            seen_503 |= status == 503 and "poll thread" in body["reason"]
        except OSError:
            pass
        time.sleep(0.05)
    assert proc.wait(timeout=5) == 1
    assert "capture stopped" in proc.stderr.read()
    assert seen_503


@pytest.mark.bpf
def test_tracefs_unmounted_at_start_is_mounted():
    tracefs = "/sys/kernel/tracing"
    if os.path.ismount(tracefs):
        subprocess.run(["umount", tracefs], check=True)
    assert not os.path.ismount(tracefs)
    from netmon import Monitor
    with Monitor(capacity=64, backend="syscall") as m:  # the only one that needs tracefs
        assert m.running
    assert os.path.ismount(tracefs)



def test_service_files_ship_with_the_package():
    import netmon
    data = os.path.join(os.path.dirname(netmon.__file__), "data")
    unit = open(os.path.join(data, "netmon.service")).read()
    for directive in ("Type=notify", "AmbientCapabilities=", "CapabilityBoundingSet=",
                      "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                      "PrivateTmp=yes", "RestrictAddressFamilies=", "MemoryMax=",
                      "Restart=on-failure"):
        assert f"\n{directive}" in unit, directive
    assert "CAP_SYS_ADMIN" not in unit.split("CapabilityBoundingSet=")[1].splitlines()[0]
    ds = open(os.path.join(data, "netmon-daemonset.yaml")).read()
    assert "kind: DaemonSet" in ds and 'drop: ["ALL"]' in ds and "/health" in ds


@pytest.mark.bpf
def test_sd_notify_ready_once_listening(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(10)
    proc, addr, _ = start(env={"NOTIFY_SOCKET": path})
    try:
        assert sock.recv(100) == b"READY=1"
        assert http(f"http://{addr}/health")[0] == 200  # listening by then
    finally:
        assert stop(proc) == 0
    assert sock.recv(100) == b"STOPPING=1"
