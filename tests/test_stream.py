"""GET /api/events/stream over real HTTP: an in-process Server on an ephemeral loopback
port with a synthetic monitor, read by http.client the way an SSE client reads; the last
test streams real kernel events from the netmon command (root)."""
import http.client
import json
import socket
import threading
import time

import pytest
from helpers import run_child, start_netmon

import netmon.web.events as events_api
from netmon.testing import record, synthetic_monitor
from netmon.web import make_app
from netmon.web.limits import MAX_STREAMS
from netmon.web.server import Server


class Stream:
    """One SSE client. next() -> {"event", "id", "data"} or {"comment"}."""

    def __init__(self, port, path="/api/events/stream", headers=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        if self.status == 200:
            assert self.resp.getheader("Content-Type").startswith("text/event-stream")
            assert self.next() == {"comment": "netmon event stream"}

    def next(self):
        msg = {}
        while True:
            line = self.resp.readline()
            if not line:
                return None  # the server ended the stream
            line = line.decode().rstrip("\n")
            if not line:
                return msg
            if line.startswith(":"):
                msg["comment"] = line[1:].strip()
            else:
                field, _, value = line.partition(": ")
                msg[field] = json.loads(value) if field == "data" else value

    def events(self, n):
        out = [self.next() for _ in range(n)]
        assert all("id" in m for m in out), out
        return out

    def close(self):
        self.conn.close()


@pytest.fixture
def served(request):
    """(monitor, port, server): a Server on 127.0.0.1:0 serving a synthetic monitor."""
    capacity = getattr(request, "param", 4096)
    mon = synthetic_monitor(capacity)
    shutdown = threading.Event()
    server = Server(make_app(mon, shutdown=shutdown), "127.0.0.1", 0, shutdown=shutdown)
    server.bind()
    server.start()
    yield mon, server.address[1], server
    server.stop()


def seqs(msgs):
    return [int(m["id"]) for m in msgs]


def test_live_events_after_connecting(served):
    mon, port, _ = served
    mon.inject(record(pid=1))  # before the client: not sent
    s = Stream(port)
    for pid in (2, 3, 4):
        mon.inject(record(pid=pid, ip="10.9.8.7", port=443))
    msgs = s.events(3)
    assert [m["event"] for m in msgs] == ["connect"] * 3
    assert seqs(msgs) == [2, 3, 4]
    assert [m["data"]["pid"] for m in msgs] == [2, 3, 4]
    assert msgs[0]["data"]["destination"] == "10.9.8.7:443"
    s.close()


def test_filters_and_kinds(served):
    mon, port, _ = served
    s = Stream(port, "/api/events/stream?pid=7&kind=all")
    mon.inject(record(pid=6))
    mon.inject(record(pid=7, kind=2, sock_type=2, packets=4))
    mon.inject(record(pid=8))
    mon.inject(record(pid=7, ret=-111))
    msgs = s.events(2)
    assert [(m["event"], m["id"]) for m in msgs] == [("udp_send", "2"), ("connect", "4")]
    assert msgs[1]["data"]["error"] == "ECONNREFUSED"


def test_an_event_is_sent_once_its_handshake_ended(served):
    """A non-blocking connect waits for its outcome (the events after it with it), so a
    client never has to patch an event it already has."""
    mon, port, _ = served
    s = Stream(port, "/api/events/stream?result=ECONNREFUSED")  # it only matches later
    mon.inject(record(pid=1, sock_id=0xA0, ret=-115, outcome=1))
    mon.inject(record(pid=2, ret=-111, outcome=3))
    time.sleep(0.3)  # unheld, 1 would be skipped (pending matches no errno) and 2 sent
    mon.inject(record(kind=3, sock_id=0xA0, outcome=3, ret=-111, latency_us=64, pid=0))
    msgs = s.events(2)
    assert [(m["data"]["pid"], m["data"]["return_code"], m["data"]["error"],
             m["data"]["outcome"], m["data"]["latency_us"]) for m in msgs] == [
        (1, -115, "ECONNREFUSED", "refused", 64), (2, -111, "ECONNREFUSED", "refused", None)]
    s.close()


def test_resume_from_last_event_id_without_loss_or_repetition(served):
    mon, port, _ = served
    for pid in range(10):
        mon.inject(record(pid=pid))
    first = Stream(port, "/api/events/stream?after=0")
    got = first.events(4)
    first.close()
    again = Stream(port, "/api/events/stream?after=0",  # the header wins over after=
                   headers={"Last-Event-ID": got[-1]["id"]})
    mon.inject(record(pid=10))
    got += again.events(7)
    assert seqs(got) == list(range(1, 12))


@pytest.mark.parametrize("served", [16], indirect=True)
def test_gap_when_the_cursor_was_overwritten(served):
    mon, port, _ = served
    for _ in range(50):
        mon.inject(record())
    s = Stream(port, headers={"Last-Event-ID": "3"})
    gap = s.next()
    assert gap["event"] == "gap" and gap["id"] == "34"
    assert gap["data"] == {"missed": 31, "first_seq": 4, "last_seq": 34}
    assert seqs(s.events(16)) == list(range(35, 51))


class Gate:
    """A monitor whose first query waits until the test lets it run: the store can be
    made to overflow while a live stream is between two reads."""

    def __init__(self, mon):
        self._mon, self.entered, self.release = mon, threading.Event(), threading.Event()

    def follow_page(self, *args, **kwargs):
        if not self.release.is_set():
            self.entered.set()
            self.release.wait(10)
        return self._mon.follow_page(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._mon, name)


def test_gap_when_a_live_client_falls_behind():
    mon = synthetic_monitor(16)
    gate = Gate(mon)
    shutdown = threading.Event()
    server = Server(make_app(gate, shutdown=shutdown), "127.0.0.1", 0, shutdown=shutdown)
    server.bind()
    server.start()
    try:
        s = Stream(server.address[1])
        assert gate.entered.wait(10)
        for _ in range(50):  # 34 are overwritten before the stream reads again
            mon.inject(record())
        gate.release.set()
        gap = s.next()
        assert gap["event"] == "gap" and gap["data"]["missed"] == 34
        assert seqs(s.events(16)) == list(range(35, 51))
    finally:
        gate.release.set()
        server.stop()


def test_keepalive_when_idle(served, monkeypatch):
    monkeypatch.setattr(events_api, "KEEPALIVE_SECONDS", 0.05)
    _, port, _ = served
    assert Stream(port).next() == {"comment": "keepalive"}


@pytest.mark.parametrize("query, headers, param", [
    ("?pid=x", {}, "pid"), ("?bogus=1", {}, "unknown query parameter bogus"),
    ("?limit=5", {}, "unknown query parameter limit"),
    ("", {"Last-Event-ID": "abc"}, "Last-Event-ID"),
    ("", {"Last-Event-ID": "\x83"}, "Last-Event-ID"),  # not UTF-8: once a 500
])
def test_bad_parameters_are_400_before_streaming(served, query, headers, param):
    _, port, _ = served
    s = Stream(port, "/api/events/stream" + query, headers)
    assert s.status == 400
    assert json.loads(s.resp.read())["message"].startswith(param)


def test_stream_cap_is_429_and_requests_still_served(served, monkeypatch):
    monkeypatch.setattr(events_api, "KEEPALIVE_SECONDS", 0.05)  # a gone client is noticed soon
    mon, port, _ = served
    streams = [Stream(port) for _ in range(MAX_STREAMS)]
    assert all(s.status == 200 for s in streams)
    extra = Stream(port)
    assert extra.status == 429
    assert extra.resp.getheader("Retry-After") == str(events_api.STREAM_RETRY_AFTER)
    assert json.loads(extra.resp.read())["error"] == "Too Many Requests"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/events?limit=1")  # the streams do not starve requests
    assert conn.getresponse().status == 200
    mon.inject(record(pid=42))
    assert streams[-1].events(1)[0]["data"]["pid"] == 42
    streams.pop().close()
    deadline = time.monotonic() + 10  # the closed stream's slot frees once a write to it
    while True:                       # fails: a keepalive or two later, however busy
        s = Stream(port)
        if s.status == 200 or time.monotonic() > deadline:
            break
        s.resp.read()
        time.sleep(0.01)
    assert s.status == 200
    for s in streams:
        s.close()


def test_shutdown_ends_open_streams_cleanly():
    mon = synthetic_monitor()
    shutdown = threading.Event()
    server = Server(make_app(mon, shutdown=shutdown), "127.0.0.1", 0, shutdown=shutdown)
    server.bind()
    server.start()
    streams = [Stream(server.address[1]) for _ in range(5)]
    server.stop()  # joins its thread: returns once the streams have ended
    for s in streams:
        assert s.next() is None  # a clean end of the chunked body, not a reset
        assert s.resp.isclosed()


# ---- real kernel events through the netmon command (root) ----

@pytest.mark.bpf
def test_real_connects_stream_and_resume():
    proc, port, _ = start_netmon("--backend", "syscall")  # results final when streamed
    try:
        comm = "nm-sse-child"
        s = Stream(port, f"/api/events/stream?command={comm}")
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            target = ["127.0.0.1", listener.getsockname()[1]]
            ops = [{"family": "inet", "addr": target, "repeat": 3}]
            child = run_child(comm, ops)["pid"]
        msgs = s.events(3)
        s.close()
        for m in msgs:
            assert m["event"] == "connect"
            assert m["data"]["pid"] == child and m["data"]["command"] == comm
            assert m["data"]["destination"] == f"127.0.0.1:{target[1]}"
            assert m["data"]["return_code"] == 0
        resumed = Stream(port, f"/api/events/stream?command={comm}",
                         headers={"Last-Event-ID": msgs[0]["id"]})
        assert seqs(resumed.events(2)) == seqs(msgs[1:])
        resumed.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
