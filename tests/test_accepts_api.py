"""Accept events and source addresses through the API in process (synthetic records, no
root): kind=accept/all, src= and sport=, /api/top?by=service|client, /metrics and
/api/stats by result, and the seed endpoints counting connect attempts only."""
import io

import pytest
from helpers import call
from netmon._core import NETMON_F_NO_OWNER, NETMON_KIND_ACCEPT
from prometheus_client.parser import text_string_to_metric_families

from netmon.testing import record, synthetic_monitor
from netmon.web import make_app

ACCEPT = dict(kind=NETMON_KIND_ACCEPT, outcome=2)
DATA = [  # seq = index + 1
    dict(pid=10, comm="sshd", ip="10.0.0.5", port=22, src_ip="192.0.2.7", src_port=50001,
         **ACCEPT),
    dict(pid=10, comm="sshd", ip="10.0.0.5", port=22, src_ip="192.0.2.7", src_port=50002,
         **ACCEPT),
    dict(pid=10, comm="sshd", ip="10.0.0.5", port=22, src_ip="198.51.100.1", src_port=40000,
         **ACCEPT),
    dict(pid=20, comm="nginx", ip="::1", port=443, src_ip="::1", src_port=40000, **ACCEPT),
    dict(pid=0, comm="", ip="10.0.0.5", port=8080, src_ip="192.0.2.9", src_port=1234,
         flags=NETMON_F_NO_OWNER, **ACCEPT),
    dict(pid=10, comm="sshd", ip="10.0.0.9", port=53, src_ip="10.0.0.5", src_port=40000),
    dict(pid=10, comm="sshd", ip="10.0.0.9", port=443),  # a connect, source unknown
    dict(pid=11, comm="busctl", path="/run/" + "x" * 40),  # path bytes where inet's source is
]
UNIX_SPORT = int.from_bytes(b"xx", "little")  # what those bytes would read as


@pytest.fixture(scope="module")
def app():
    mon = synthetic_monitor()
    for kw in DATA:
        mon.inject(record(**kw))
    return make_app(mon)


def seqs(app, query):
    r = call(app, "GET", "/api/events", query=query)
    assert r.status == 200, r.body
    return [e["seq"] for e in r.body["events"]]


@pytest.mark.parametrize("query, expected", [
    ("", [6, 7, 8]), ("kind=accept", [1, 2, 3, 4, 5]), ("kind=all", [1, 2, 3, 4, 5, 6, 7, 8]),
    ("kind=accept&src=192.0.2.0/24", [1, 2, 5]), ("kind=all&sport=40000", [3, 4, 6]),
    ("kind=all&src=::1", [4]), ("src=10.0.0.5", [6]), ("kind=accept&port=22&pid=10", [1, 2, 3]),
    ("kind=all&src=0.0.0.0/0", [1, 2, 3, 5, 6]),  # an unknown source matches no network
    (f"kind=all&sport={UNIX_SPORT}", []), ("kind=all&src=::/0", [4]),
])
def test_filters(app, query, expected):
    assert seqs(app, query) == expected


def test_accept_event_shape(app):
    r = call(app, "GET", "/api/events", query="kind=accept&limit=5")
    first, orphan = r.body["events"][0], r.body["events"][4]
    assert {k: first[k] for k in ("kind", "pid", "command", "destination", "destination_port",
                                  "source_ip", "source_port", "outcome", "service")} == {
        "kind": "accept", "pid": 10, "command": "sshd", "destination": "10.0.0.5:22",
        "destination_port": 22, "source_ip": "192.0.2.7", "source_port": 50001,
        "outcome": "established", "service": "SSH"}
    assert (orphan["pid"], orphan["command"], orphan["uid"]) == (None, None, None)
    r = call(app, "GET", "/api/events", query="limit=2")
    for e in r.body["events"]:  # a connect whose source is unknown; a unix path
        assert (e["source_ip"], e["source_port"]) == (None, None)
    assert r.body["events"][1]["destination"] == "/run/" + "x" * 40
    assert r.body["filters"]["kind"] == "connect"


def test_top_by_service_and_client(app):
    r = call(app, "GET", "/api/top", query="kind=accept&by=service")
    assert [(t["port"], t["command"], t["service"], t["count"]) for t in r.body["top"]] == [
        (22, "sshd", "SSH", 3), (8080, None, "HTTP-ALT", 1), (443, "nginx", "HTTPS", 1)]
    r = call(app, "GET", "/api/top", query="kind=accept&by=client")
    assert [(t["source_ip"], t["count"]) for t in r.body["top"]] == [
        ("192.0.2.7", 2), ("192.0.2.9", 1), ("::1", 1), ("198.51.100.1", 1)]
    assert r.body["filters"]["kind"] == "accept" and r.body["groups"] == 4


def test_seed_endpoints_count_connects_only(app):
    r = call(app, "POST", "/api/connection-summary", {"pid": 10, "duration": 60})
    assert r.body["total_attempts"] == 2
    r = call(app, "GET", "/api/list-connections", query="pid=10")
    assert [e["kind"] for e in r.body["connections"]["10"]] == ["connect", "connect"]


def _metrics(app) -> dict:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
               "wsgi.errors": io.StringIO()}
    text = b"".join(app(environ, lambda *a: None)).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_and_stats_count_accepts_by_result(app):
    s = _metrics(app)
    assert s[("netmon_tcp_accepts_total", frozenset({("result", "accepted")}))] == 5
    assert s[("netmon_tcp_accepts_total", frozenset({("result", "closed_port")}))] == 0
    attempts = sum(v for (name, _), v in s.items() if name == "netmon_connect_attempts_total")
    assert attempts == 3
    r = call(app, "GET", "/api/stats")
    assert r.body["inbound"] == {"accepted": 5, "closed_port": 0, "listen_drops": 0}
