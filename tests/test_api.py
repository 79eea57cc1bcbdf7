"""The HTTP API, in process: synthetic records through the store, WSGI calls into the app.
No root, no BPF, no sockets."""
import json
import logging
import re

import pytest
from helpers import Healthy, assert_error, call

import netmon
from netmon.testing import record, synthetic_monitor
from netmon.web import make_app
from netmon.web.limits import MAX_BODY_BYTES

DURATION = "duration must be between 1 and 3600 seconds"
BOTH = "cannot specify both pid and command"
NEITHER = "must specify either pid or command"
BAD_JSON = "invalid JSON request body"
BAD_PID = "pid must be a positive integer"
BAD_COMMAND = "command must be a non-empty string of at most 15 characters"
BAD_LIMIT = "limit must be between 1 and 1000"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@pytest.fixture
def mon():
    return synthetic_monitor()


@pytest.fixture
def app(mon):
    return make_app(mon)


def summary(app, **body):
    return call(app, "POST", "/api/connection-summary", body)


# ---- GET / ----

def test_index_lists_every_route_with_a_description(app):
    r = call(app, "GET", "/")
    assert r.status == 200
    assert r.body["service"] == "netmon"
    assert r.body["version"] == netmon.__version__
    assert r.body["description"]
    assert set(r.body["endpoints"]) == {
        "GET /", "GET /health", "POST /api/connection-summary",
        "GET /api/list-connections", "POST /api/list-connections", "GET /api/events",
        "GET /api/events/stream", "GET /api/top", "GET /api/stats", "GET /metrics",
        "GET /openapi.json"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in r.body["endpoints"].values())


# ---- GET /health ----

def test_health_healthy(mon):
    for _ in range(3):
        mon.inject(record())
    r = call(make_app(Healthy(mon)), "GET", "/health")
    assert r.status == 200
    assert r.body["status"] == "healthy"
    assert r.body["service"] == "netmon"
    assert r.body["version"] == netmon.__version__
    assert r.body["events_captured"] == 3
    assert r.body["events_dropped"] == 0
    assert r.body["uptime_seconds"] >= 0
    assert r.body["backend"] == "auto"  # the default, resolved only by start()
    assert "reason" not in r.body and "missing_hooks" not in r.body


def test_health_unhealthy_when_detached(app):
    """A monitor that was never started has no programs attached."""
    r = call(app, "GET", "/health")
    assert r.status == 503
    assert r.body["status"] == "unhealthy"
    assert r.body["reason"] == "the BPF programs are not attached"
    assert r.body["service"] == "netmon"


def test_health_unhealthy_when_poll_stalls(mon):
    stalled = "the poll thread has not drained the ring for 3.0 s"
    r = call(make_app(Healthy(mon, (False, stalled))), "GET", "/health")
    assert (r.status, r.body["status"], r.body["reason"]) == (503, "unhealthy", stalled)


# ---- POST /api/connection-summary ----

def test_summary_by_pid(mon, app):
    for ret in (0, -111, 0):  # failed attempts count too
        mon.inject(record(pid=1234, comm="curl", ret=ret))
    mon.inject(record(pid=999, comm="curl"))
    r = summary(app, pid=1234, duration=60)
    assert r.status == 200
    assert r.body == {"total_attempts": 3, "pid": 1234, "command": None, "duration": 60,
                      "message": "Found 3 connection attempts from PID 1234 over 60 seconds"}


def test_summary_by_command_is_exact(mon, app):
    for comm in ("curl", "curl", "curl2", "cur", "wget"):
        mon.inject(record(comm=comm))
    r = summary(app, command="curl", duration=60)
    assert r.status == 200
    assert r.body == {"total_attempts": 2, "pid": None, "command": "curl", "duration": 60,
                      "message": "Found 2 connection attempts from command 'curl' over 60 seconds"}


def test_summary_window_boundaries(mon, app):
    # the store keeps arrival order, which is time order: inject oldest first
    for age in (121, 61, 59, 0):
        mon.inject(record(pid=7, age=age))
    assert summary(app, pid=7, duration=60).body["total_attempts"] == 2
    assert summary(app, pid=7, duration=62).body["total_attempts"] == 3
    assert summary(app, pid=7, duration=120).body["total_attempts"] == 3
    assert summary(app, pid=7, duration=3600).body["total_attempts"] == 4
    assert summary(app, pid=7, duration=1).body["total_attempts"] == 1


def test_summary_none_found(app):
    r = summary(app, command="nobody", duration=5)
    assert r.status == 200
    assert r.body["total_attempts"] == 0
    assert r.body["message"] == "Found 0 connection attempts from command 'nobody' over 5 seconds"


def test_summary_ignores_unknown_fields_and_accepts_limits(mon, app):
    mon.inject(record(pid=2**32 - 1, comm="a" * 15))
    assert summary(app, pid=2**32 - 1, duration=3600, extra=[1]).body["total_attempts"] == 1
    assert summary(app, command="a" * 15, duration=1).body["total_attempts"] == 1
    assert summary(app, pid=5, command=None, duration=60).status == 200


@pytest.mark.parametrize("body, message", [
    ({"pid": 1}, DURATION),
    ({"pid": 1, "duration": None}, DURATION),
    ({"pid": 1, "duration": 0}, DURATION),
    ({"pid": 1, "duration": -5}, DURATION),
    ({"pid": 1, "duration": 3601}, DURATION),
    ({"pid": 1, "duration": "60"}, DURATION),
    ({"pid": 1, "duration": 60.0}, DURATION),
    ({"pid": 1, "duration": True}, DURATION),
    ({"pid": 1, "command": "curl", "duration": 60}, BOTH),
    ({"duration": 60}, NEITHER),
    ({"pid": None, "command": None, "duration": 60}, NEITHER),
    ({"pid": 0, "duration": 60}, BAD_PID),
    ({"pid": -1, "duration": 60}, BAD_PID),
    ({"pid": "1234", "duration": 60}, BAD_PID),
    ({"pid": 1.5, "duration": 60}, BAD_PID),
    ({"pid": True, "duration": 60}, BAD_PID),
    ({"pid": 2**32, "duration": 60}, BAD_PID),
    ({"command": "", "duration": 60}, BAD_COMMAND),
    ({"command": "a" * 16, "duration": 60}, BAD_COMMAND),
    ({"command": "é" * 8, "duration": 60}, BAD_COMMAND),  # 16 bytes: can never match comm
    ({"command": 5, "duration": 60}, BAD_COMMAND),
    ({"command": ["curl"], "duration": 60}, BAD_COMMAND),
])
def test_summary_validation(app, body, message):
    assert_error(call(app, "POST", "/api/connection-summary", body), 400, "Bad Request", message)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'"pid"', b"null", b"42", b"\xff\xfe",
                                 b'{"pid": 1, "duration": 60', b'{"command": "\\ud800"}x'])
def test_summary_invalid_json(app, raw):
    assert_error(call(app, "POST", "/api/connection-summary", raw), 400, "Bad Request", BAD_JSON)


def test_summary_lone_surrogate_command_is_rejected(app):
    r = call(app, "POST", "/api/connection-summary", b'{"command": "\\ud800", "duration": 60}')
    assert_error(r, 400, "Bad Request", BAD_COMMAND)


def test_summary_get_is_405_with_allow(app):
    r = call(app, "GET", "/api/connection-summary")
    assert_error(r, 405, "Method Not Allowed")
    assert r.headers["Allow"] == "POST"


# ---- /api/list-connections ----

def test_list_event_fields(mon, app):
    mon.inject(record(pid=4242, tid=4243, uid=1000, comm="curl", ip="10.1.2.3", port=443,
                      ret=-111, cgroup_id=77))
    r = call(app, "GET", "/api/list-connections")
    assert r.status == 200
    (ev,) = r.body["connections"]["4242"]
    ts = ev.pop("timestamp")
    assert RFC3339.fullmatch(ts) and ev.pop("wall_time") == ts
    expected = {"seq": 1, "pid": 4242, "tid": 4243, "uid": 1000, "command": "curl",
                "destination": "10.1.2.3:443", "destination_ip": "10.1.2.3",
                "destination_port": 443, "address_family": 2, "protocol": "TCP",
                "socket_type": "STREAM", "service": "HTTPS", "return_code": -111,
                "error": "ECONNREFUSED", "cgroup_id": 77, "truncated": False}
    assert {k: ev.get(k, "missing") for k in expected} == expected


def test_list_other_families(mon, app):
    mon.inject(record(pid=1, ip="::1", port=53, sock_type=2))
    mon.inject(record(pid=1, path="/run/app.sock"))
    mon.inject(record(pid=1, path="@abstract"))
    v6, unix, abstract = call(app, "GET", "/api/list-connections").body["connections"]["1"]
    assert (v6["destination"], v6["destination_ip"], v6["destination_port"]) == \
        ("[::1]:53", "::1", 53)
    assert (v6["address_family"], v6["protocol"], v6["socket_type"], v6["service"]) == \
        (10, "UDP", "DGRAM", "DNS")
    assert (unix["destination"], unix["destination_ip"], unix["destination_port"]) == \
        ("/run/app.sock", None, None)
    assert (unix["address_family"], unix["protocol"]) == (1, "UNIX")
    assert abstract["destination"] == "@abstract"


def test_list_groups_by_pid_oldest_first(mon, app):
    for i in range(3):
        mon.inject(record(pid=20, port=1000 + i))
        mon.inject(record(pid=10, port=2000 + i))
    r = call(app, "GET", "/api/list-connections")
    assert r.body["total_pids"] == 2
    assert list(r.body["connections"]) == ["10", "20"]
    assert [e["destination_port"] for e in r.body["connections"]["20"]] == [1000, 1001, 1002]
    assert [e["destination_port"] for e in r.body["connections"]["10"]] == [2000, 2001, 2002]
    assert r.body["truncated"] is False
    assert r.body["message"] == "Found 6 total connections across 2 processes"


def test_list_limit_keeps_the_newest_and_says_truncated(mon, app):
    for i in range(5):
        mon.inject(record(pid=30, port=i + 1))
    mon.inject(record(pid=31, port=99))
    r = call(app, "GET", "/api/list-connections", query="limit=2")
    assert [e["destination_port"] for e in r.body["connections"]["30"]] == [4, 5]
    assert [e["destination_port"] for e in r.body["connections"]["31"]] == [99]
    assert r.body["truncated"] is True
    assert r.body["message"] == "Found 3 total connections across 2 processes"
    r = call(app, "POST", "/api/list-connections", {"limit": 5})
    assert r.body["truncated"] is False


def test_list_default_limit_is_100(mon, app):
    for _ in range(101):
        mon.inject(record(pid=40))
    r = call(app, "GET", "/api/list-connections")
    assert len(r.body["connections"]["40"]) == 100 and r.body["truncated"] is True
    r = call(app, "GET", "/api/list-connections", query="limit=1000")
    assert len(r.body["connections"]["40"]) == 101 and r.body["truncated"] is False


def test_list_one_pid(mon, app):
    mon.inject(record(pid=50))
    mon.inject(record(pid=51))
    for r in (call(app, "GET", "/api/list-connections", query="pid=51"),
              call(app, "POST", "/api/list-connections", {"pid": 51, "other": "ignored"})):
        assert r.status == 200
        assert list(r.body["connections"]) == ["51"]
        assert r.body["message"] == "Found 1 total connections across 1 processes"


def test_list_empty(app):
    for r in (call(app, "GET", "/api/list-connections", query="pid=&limit="),
              call(app, "POST", "/api/list-connections", {})):
        assert r.body == {"total_pids": 0, "connections": {}, "truncated": False,
                          "message": "Found 0 total connections across 0 processes"}


@pytest.mark.parametrize("query, message", [
    ("limit=0", BAD_LIMIT), ("limit=1001", BAD_LIMIT), ("limit=-1", BAD_LIMIT),
    ("limit=ten", BAD_LIMIT), ("limit=1.5", BAD_LIMIT), ("limit=" + "9" * 30, BAD_LIMIT),
    ("pid=abc", BAD_PID), ("pid=0", BAD_PID), ("pid=4294967296", BAD_PID),
])
def test_list_get_validation(app, query, message):
    r = call(app, "GET", "/api/list-connections", query=query)
    assert_error(r, 400, "Bad Request", message)


@pytest.mark.parametrize("body, message", [
    ({"limit": 0}, BAD_LIMIT), ({"limit": "10"}, BAD_LIMIT), ({"limit": True}, BAD_LIMIT),
    ({"limit": 2.0}, BAD_LIMIT), ({"pid": "51"}, BAD_PID), ({"pid": -3}, BAD_PID),
    (b"", BAD_JSON), (b"[1]", BAD_JSON), (b"{]", BAD_JSON),
])
def test_list_post_validation(app, body, message):
    r = call(app, "POST", "/api/list-connections", body)
    assert_error(r, 400, "Bad Request", message)


# ---- protocol errors ----

def test_unknown_path_is_404(app):
    assert_error(call(app, "GET", "/api/nope"), 404, "Not Found")
    assert_error(call(app, "GET", "/health/"), 404, "Not Found")


@pytest.mark.parametrize("method, path, allow", [
    ("POST", "/health", "GET"),
    ("DELETE", "/", "GET"),
    ("PUT", "/api/list-connections", "GET,POST"),
])
def test_wrong_method_is_405_with_allow(app, method, path, allow):
    r = call(app, method, path)
    assert_error(r, 405, "Method Not Allowed")
    assert r.headers["Allow"] == allow


def test_body_over_16k_is_413(app):
    padded = json.dumps({"pid": 1, "duration": 60}).encode().ljust(MAX_BODY_BYTES)
    assert call(app, "POST", "/api/connection-summary", padded).status == 200
    r = call(app, "POST", "/api/connection-summary", padded + b" ")
    assert_error(r, 413, "Request Entity Too Large")
    # the declared length is enough: nothing is read
    r = call(app, "POST", "/api/list-connections", b"{}", headers={"CONTENT_LENGTH": "99999"})
    assert_error(r, 413, "Request Entity Too Large")


def test_chunked_body_is_411(app):
    r = call(app, "POST", "/api/list-connections", b"{}",
             headers={"HTTP_TRANSFER_ENCODING": "chunked"})
    assert_error(r, 411, "Length Required")


def test_fault_is_500_logged_not_leaked(mon, caplog):
    class Broken(Healthy):
        def count(self, **kwargs):
            raise RuntimeError("secret detail")

    with caplog.at_level(logging.ERROR, logger="netmon.api"):
        r = summary(make_app(Broken(mon)), pid=1, duration=60)
    assert_error(r, 500, "Internal Server Error")
    assert "secret" not in json.dumps(r.body) and "Traceback" not in json.dumps(r.body)
    assert "secret detail" in caplog.text


def test_handlers_do_not_change_the_store(mon, app):
    mon.inject(record(pid=60))
    before = mon.stats()
    call(app, "GET", "/api/list-connections")
    summary(app, pid=60, duration=60)
    call(app, "GET", "/health")
    after = mon.stats()
    assert (after["delivered"], after["size"], after["last_seq"]) == \
        (before["delivered"], before["size"], before["last_seq"])
