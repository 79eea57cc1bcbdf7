"""Hostile clients against a real server (in process, synthetic data, no root): each gets
a 4xx JSON answer or a closed socket, and the server keeps answering others."""
import json
import socket
import time

import pytest

from netmon.testing import record, synthetic_monitor
from netmon.web import make_app
from netmon.web.server import Server


@pytest.fixture(scope="module")
def srv():
    m = synthetic_monitor(1024)
    m.inject(record(pid=42, comm="curl"))
    server = Server(make_app(m), "127.0.0.1", 0)
    server.bind()
    server.start()
    yield server.address
    server.stop()


def exchange(addr, raw: bytes, timeout=5.0):
    """Send raw bytes; (status or None if the socket closed without an answer, JSON body)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    if not data:
        return None, None
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, head
    return int(head.split()[1]), json.loads(body[:_length(data)])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def post(path, body: bytes, ctype=b"application/json"):
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + ctype +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
            + body)


def healthy(addr):
    status, body = exchange(addr, b"GET /api/list-connections?pid=42 HTTP/1.1\r\n"
                                  b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
    return status == 200 and body["total_pids"] == 1


SUMMARY = b"/api/connection-summary"


@pytest.mark.parametrize("raw, status", [
    (post(SUMMARY, b"[1, 2, 3]"), 400),                                   # JSON, not an object
    (post(SUMMARY, b'"pid"'), 400),
    (post(SUMMARY, b'{"pid": 1180591620717411303424, "duration": 60}'), 400),  # 2**70
    (post(SUMMARY, b'{"pid": -5, "duration": 60}'), 400),
    (post(SUMMARY, b'{"pid": 0, "duration": 60}'), 400),
    (post(SUMMARY, b'{"pid": 1e400, "duration": 60}'), 400),
    (post(SUMMARY, b'{"command": "a\\u0000b", "duration": 60}'), 400),    # NUL
    (post(SUMMARY, b'{"command": "\\ud800", "duration": 60}'), 400),      # lone surrogate
    (post(SUMMARY, b'{"pid": 42, "pid": 43, "duration": 60}'), 400),      # duplicate keys
    (post(SUMMARY, b'\xff\xfe{}'), 400),                                  # not UTF-8
    (post(SUMMARY, b"pid=42&duration=60", b"application/x-www-form-urlencoded"), 400),
    (post(SUMMARY, b"--x\r\nContent-Disposition: form-data\r\n\r\n1\r\n--x--",
          b"multipart/form-data; boundary=x"), 400),
    (post(SUMMARY, b"{" * 100000)[:20000], 413),                          # > 16 KiB
    (b"GET /api/list-connections?" + b"a=1&" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"y" * 20000 + b"\r\n\r\n", 413),
    (b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64, 400),   # TLS to plain HTTP
])
def test_hostile_request_gets_4xx_json_or_closed(srv, raw, status):
    got, body = exchange(srv, raw)
    assert got is None or (got == status and body["error"] and body["message"]), (got, body)
    assert healthy(srv)


def test_unicode_command_is_fine(srv):
    got, body = exchange(srv, post(SUMMARY, '{"command": "ünïcødé", "duration": 60}'.encode()))
    assert got == 200 and body["total_attempts"] == 0


def test_one_megabyte_body(srv):
    body = b'{"pid": 42, "duration": 60, "x": "' + b"a" * (1 << 20) + b'"}'
    got, answer = exchange(srv, post(SUMMARY, body))
    assert got in (None, 413)
    assert healthy(srv)


def test_idle_and_slowloris_clients_do_not_starve_others(srv):
    idle = [socket.create_connection(srv) for _ in range(200)]
    slow = []
    for _ in range(4):  # fewer than the worker pool: each holds a worker until its timeout
        s = socket.create_connection(srv)
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append(s)
    try:
        for i in range(10):
            for s in slow:
                s.sendall(b"X-Slow-%d: y\r\n" % i)
            assert healthy(srv)
            time.sleep(0.1)
    finally:
        for s in idle + slow:
            s.close()
    assert healthy(srv)
