"""GET /api/events and /api/top in process: every filter, their combinations, the errors
that name the bad parameter, and cursor paging through a store that fills and evicts.
Synthetic records, no root."""
import datetime as dt
import json
import random
import socket

import pytest
from helpers import assert_error, call
from netmon._core import (
    NETMON_F_NO_ADDR,
    NETMON_F_NO_OWNER,
    NETMON_KIND_ACCEPT,
    NETMON_KIND_UDP_SEND,
    NETMON_OUTCOME_ESTABLISHED,
    NETMON_OUTCOME_FAILED,
)

from netmon.event import events_json
from netmon.testing import record, synthetic_monitor
from netmon.web import make_app
from netmon.web.base import RawJSON, json_answer

# (name, record kwargs); injected in this order, so seq = index + 1
DATA = [
    ("old", dict(age=600, ip="10.0.0.0", port=443, pid=1, comm="curl")),
    ("v4-first", dict(age=100, ip="10.0.0.1", port=443, pid=1, comm="curl")),
    ("v4-last", dict(age=90, ip="10.255.255.255", port=80, pid=2, comm="wget", ret=-111)),
    ("v4-above", dict(age=80, ip="11.0.0.0", port=80, pid=2, comm="wget", ret=-110)),
    ("v4-below", dict(age=70, ip="9.255.255.255", port=53, pid=3, comm="dig", sock_type=2)),
    ("v6-lo", dict(age=60, ip="::1", port=443, pid=3, comm="dig", ret=-111)),
    ("v6-two", dict(age=50, ip="::2", port=443, pid=4, comm="python3")),
    ("v6-doc", dict(age=40, ip="2001:db8::1", port=8443, pid=4, comm="python3", sock_type=2)),
    ("v6-doc-end", dict(age=30, ip="2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", port=8443,
                        pid=4, comm="python3")),
    ("v6-next", dict(age=20, ip="2001:db9::", port=8443, pid=4, comm="python3")),
    ("unix-path", dict(age=10, path="/run/dbus/system_bus_socket", pid=5, comm="busctl")),
    ("unix-abstract", dict(age=5, path="@/tmp/.X11-unix/X0", pid=5, comm="busctl", ret=-2)),
    ("udp-send", dict(age=3, ip="10.1.2.3", port=53, pid=6, comm="dig", sock_type=2, kind=2,
                      packets=3)),
    ("unknown", dict(age=1, ip="10.0.0.7", port=22, pid=7, comm="ssh", flags=0x4)),
]
NAMES = {i + 1: name for i, (name, _) in enumerate(DATA)}


@pytest.fixture(scope="module")
def app():
    mon = synthetic_monitor()
    for _, kwargs in DATA:
        mon.inject(record(**kwargs))
    return make_app(mon)


def names(app, query):
    reply = call(app, "GET", "/api/events", query=query)
    assert reply.status == 200, reply.body
    assert reply.body["count"] == len(reply.body["events"])
    return [NAMES[e["seq"]] for e in reply.body["events"]]


ALL_CONNECTS = [n for n, _ in DATA if n != "udp-send"]


@pytest.mark.parametrize("query, expected", [
    ("", ALL_CONNECTS),
    ("pid=2", ["v4-last", "v4-above"]),
    ("command=python3", ["v6-two", "v6-doc", "v6-doc-end", "v6-next"]),
    ("family=inet", ["old", "v4-first", "v4-last", "v4-above", "v4-below", "unknown"]),
    ("family=INET6", ["v6-lo", "v6-two", "v6-doc", "v6-doc-end", "v6-next"]),
    ("family=unix", ["unix-path", "unix-abstract"]),
    ("protocol=udp", ["v4-below", "v6-doc"]),
    ("protocol=tcp&family=inet6", ["v6-lo", "v6-two", "v6-doc-end", "v6-next"]),
    ("port=8443", ["v6-doc", "v6-doc-end", "v6-next"]),
    # CIDR edges, IPv4
    ("dest=10.0.0.0/8", ["old", "v4-first", "v4-last", "unknown"]),
    ("dest=10.0.0.0/31", ["old", "v4-first"]),
    ("dest=10.0.0.1/32", ["v4-first"]),
    ("dest=10.0.0.1", ["v4-first"]),
    ("dest=10.255.255.255/32", ["v4-last"]),
    ("dest=0.0.0.0/0", ["old", "v4-first", "v4-last", "v4-above", "v4-below", "unknown"]),
    ("dest=8.0.0.0/7", ["v4-below"]),
    # CIDR edges, IPv6
    ("dest=::1/128", ["v6-lo"]),
    ("dest=::/127", ["v6-lo"]),
    ("dest=::2/127", ["v6-two"]),
    ("dest=2001:db8::/32", ["v6-doc", "v6-doc-end"]),
    ("dest=2001:db8::/31", ["v6-doc", "v6-doc-end", "v6-next"]),
    ("dest=::/0", ["v6-lo", "v6-two", "v6-doc", "v6-doc-end", "v6-next"]),
    # unix path prefixes
    ("dest=/run/", ["unix-path"]),
    ("dest=/run/dbus/system_bus_socket", ["unix-path"]),
    ("dest=/run/dbus/system_bus_socketX", []),
    ("dest=@/tmp/.X11", ["unix-abstract"]),
    ("dest=/tmp", []),  # a path, not the abstract name that looks like one
    # results
    ("result=ok", ["old", "v4-first", "v4-below", "v6-two", "v6-doc", "v6-doc-end", "v6-next",
                   "unix-path"]),
    ("result=error", ["v4-last", "v4-above", "v6-lo", "unix-abstract"]),
    ("result=ECONNREFUSED", ["v4-last", "v6-lo"]),
    ("result=etimedout", ["v4-above"]),
    ("result=ENOENT", ["unix-abstract"]),
    ("result=EACCES", []),
    # time bounds (ages of the records: 600, 100, 90, ... 1 s)
    ("since=300s", ALL_CONNECTS[1:]),
    ("since=85s&until=45s", ["v4-above", "v4-below", "v6-lo", "v6-two"]),
    ("until=15m", []),
    ("until=5m", ["old"]),
    ("since=2m", ALL_CONNECTS[1:]),
    # kinds
    ("kind=udp_send", ["udp-send"]),
    ("kind=all&command=dig", ["v4-below", "v6-lo", "udp-send"]),
    # combinations: every filter is an AND
    ("family=inet&result=error&port=80", ["v4-last", "v4-above"]),
    ("command=wget&dest=10.0.0.0/8&result=ECONNREFUSED&since=95s", ["v4-last"]),
    ("pid=4&protocol=tcp&dest=2001:db8::/32&port=8443", ["v6-doc-end"]),
    ("pid=4&command=curl", []),
    ("limit=3", ["unix-path", "unix-abstract", "unknown"]),
])
def test_filter(app, query, expected):
    assert names(app, query) == expected


def test_rfc3339_bounds_agree_with_ages(app):
    now = dt.datetime.now(dt.timezone.utc)
    since = (now - dt.timedelta(seconds=85)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    until = (now - dt.timedelta(seconds=45)).astimezone(
        dt.timezone(dt.timedelta(hours=2))).isoformat()
    assert names(app, f"since={since}&until={until.replace('+', '%2B')}") == \
        ["v4-above", "v4-below", "v6-lo", "v6-two"]


def test_response_shape_and_filters_as_understood(app):
    body = call(app, "GET", "/api/events",
                query="dest=10.1.2.3/8&result=econnrefused&family=INET&since=60s"
                      "&limit=1").body
    assert set(body) == {"events", "count", "matched", "next_after", "truncated", "filters"}
    f = body["filters"]
    assert f["dest"] == "10.0.0.0/8" and f["result"] == "ECONNREFUSED"
    assert f["family"] == "inet" and f["kind"] == "connect" and f["limit"] == 1
    since = dt.datetime.fromisoformat(f["since"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.timezone.utc) - since).total_seconds() - 60) < 60
    assert body["count"] == 0 and body["truncated"] is False
    one = call(app, "GET", "/api/events", query="limit=1").body
    assert one["count"] == 1 and one["matched"] == len(ALL_CONNECTS) and one["truncated"]
    assert one["next_after"] == len(DATA)  # the newest seq: poll on from there
    e = one["events"][0]
    assert e["seq"] == len(DATA) and e["return_code"] is None and e["error"] is None


@pytest.mark.parametrize("query, param", [
    ("pid=abc", "pid"), ("pid=-1", "pid"), ("pid=4294967296", "pid"),
    ("command=averyveryverylongname", "command"), ("family=inet7", "family"),
    ("family=2", "family"), ("protocol=sctpx", "protocol"), ("port=65536", "port"),
    ("port=http", "port"), ("dest=10.0.0.0/33", "dest"), ("dest=::1/129", "dest"),
    ("dest=example.com", "dest"), ("result=nope", "result"), ("result=EWHATEVER", "result"),
    ("since=yesterday", "since"), ("until=2026-01-01T00:00:00", "until"),
    ("kind=tcp", "kind"), ("limit=0", "limit"), ("limit=10001", "limit"),
    ("limit=x", "limit"), ("after=-5", "after"), ("after=x", "after"),
    ("after=99999999999999999999", "after"), ("pid=1&pid=2", "pid"),
    ("src=10.0.0.0/33", "src"), ("src=/run/x", "src"), ("sport=0", "sport"),
    ("sport=65536", "sport"), ("kind=accepted", "kind"),
])
def test_bad_parameter_is_a_400_naming_it(app, query, param):
    reply = call(app, "GET", "/api/events", query=query)
    assert_error(reply, 400, "Bad Request")
    assert reply.body["message"].startswith(f"{param}: ")


def test_unknown_parameters_are_named(app):
    reply = call(app, "GET", "/api/events", query="pid=1&colour=red&dst=1.2.3.4")
    assert_error(reply, 400, "Bad Request")
    assert reply.body["message"].startswith("unknown query parameter colour, dst;")


def test_far_future_bound_is_no_error(app):
    assert names(app, "until=9999-12-31T23:59:59Z") == ALL_CONNECTS
    assert names(app, "since=9999-12-31T23:59:59-12:00") == []
    assert names(app, "since=999999999h") == ALL_CONNECTS


def page_through(app, mon, after, query, push):
    """Pages of 7 after `after`; before each page push() adds events (evicting old ones).
    Each page must be exactly the first 7 matching events still held past the cursor."""
    seen = []
    for _ in range(60):
        push()
        oldest, last = mon.seq_range()
        held = [s for s in range(max(oldest, after + 1), last + 1) if query[1](s)]
        body = call(app, "GET", "/api/events", query=f"after={after}&limit=7&{query[0]}").body
        got = [e["seq"] for e in body["events"]]
        assert got == held[:7]
        assert body["truncated"] == (len(held) > 7)
        seen += got
        after = body["next_after"]
        assert after >= (got[-1] if got else after)
    assert seen == sorted(set(seen))  # never a repeat, always forward
    return seen


@pytest.mark.parametrize("query", [("", lambda s: True), ("pid=1", lambda s: s % 3 == 0)])
def test_paging_while_events_arrive_and_are_evicted(query):
    mon = synthetic_monitor(capacity=32)
    app = make_app(mon)
    rng = random.Random(7)
    pushed = []

    def push():
        for _ in range(rng.choice([0, 1, 3, 6, 9, 40])):
            pushed.append(len(pushed) + 1)
            mon.inject(record(pid=1 if len(pushed) % 3 == 0 else 2))

    seen = page_through(app, mon, 0, query, push)
    assert seen and mon.stats()["evicted"] > 0
    assert set(seen) <= {s for s in pushed if query[1](s)}


def test_paging_reaches_an_idle_end_and_resumes():
    mon = synthetic_monitor(capacity=100)
    app = make_app(mon)
    for i in range(10):
        mon.inject(record(pid=i))
    body = call(app, "GET", "/api/events", query="after=0&limit=4&pid=9").body
    assert [e["seq"] for e in body["events"]] == [10] and body["next_after"] == 10
    body = call(app, "GET", "/api/events", query="after=10&pid=9").body
    assert body["events"] == [] and body["next_after"] == 10
    mon.inject(record(pid=9))
    body = call(app, "GET", "/api/events", query=f"after={body['next_after']}").body
    assert [e["seq"] for e in body["events"]] == [11]


# ---- /api/top ----

@pytest.fixture(scope="module")
def top_app():
    mon = synthetic_monitor()
    mon.inject(record(ip="10.0.0.9", port=443, age=120))  # outside a 60 s window
    for i in range(10):  # 6 to 10.0.0.1:443 (2 refused), 3 to ::1:80 (all refused), 1 udp
        ip, port, ret = (("10.0.0.1", 443, -111 if i < 2 else 0) if i < 6 else
                         ("::1", 80, -111) if i < 9 else ("10.0.0.2", 53, 0))
        mon.inject(record(ip=ip, port=port, ret=ret, pid=100 + i % 2,
                          comm="curl" if i < 6 else "wget", sock_type=2 if port == 53 else 1))
    return make_app(mon)


def test_top_destinations(top_app):
    body = call(top_app, "GET", "/api/top").body
    assert body["by"] == "destination" and body["duration"] == 60 and body["limit"] == 10
    assert [(t["destination"], t["count"], t["failed"]) for t in body["top"]] == [
        ("10.0.0.1:443", 6, 2), ("[::1]:80", 3, 3), ("10.0.0.2:53", 1, 0)]
    assert body["groups"] == 3 and body["matched"] == 10
    wide = call(top_app, "GET", "/api/top", query="duration=3600").body
    assert wide["matched"] == 11


@pytest.mark.parametrize("query, expected", [
    ("by=command", [("curl", 6, 2), ("wget", 4, 3)]),
    ("by=port&limit=1", [(443, 6, 2)]),
    ("by=error", [("ECONNREFUSED", 5, 5)]),
    ("by=command&family=inet6", [("wget", 3, 3)]),
    ("by=port&protocol=udp", [(53, 1, 0)]),
    ("by=command&result=ok&dest=10.0.0.0/8", [("curl", 4, 0), ("wget", 1, 0)]),
])
def test_top_by_and_filters(top_app, query, expected):
    body = call(top_app, "GET", "/api/top", query=query).body
    key = query.split("&")[0].split("=")[1]
    assert [(t[key], t["count"], t["failed"]) for t in body["top"]] == expected


def test_top_by_pid_names_the_command(top_app):
    top = call(top_app, "GET", "/api/top", query="by=pid&command=wget").body["top"]
    assert {(t["pid"], t["command"], t["count"]) for t in top} == {(100, "wget", 2),
                                                                    (101, "wget", 2)}


@pytest.mark.parametrize("query, param", [
    ("by=size", "by"), ("duration=0", "duration"), ("duration=3601", "duration"),
    ("limit=0", "limit"), ("limit=1001", "limit"), ("port=x", "port"),
])
def test_top_bad_parameter(top_app, query, param):
    reply = call(top_app, "GET", "/api/top", query=query)
    assert_error(reply, 400, "Bad Request")
    assert reply.body["message"].startswith(f"{param}: ")


def test_top_refuses_events_parameters(top_app):
    reply = call(top_app, "GET", "/api/top", query="since=10s")
    assert_error(reply, 400, "Bad Request")
    assert "unknown query parameter since" in reply.body["message"]


# ---- the answer's JSON, written straight from Event tuples ----

def test_events_json_is_json_dumps_of_to_dict_for_every_kind_of_field():
    mon = synthetic_monitor(64)
    for r in (record(comm='q"\\\x1b\u00e9x', ip="::1", port=443, ret=-111),
              record(path="/run/\u00fc s\"x/" + "p" * 60, sock_type=socket.SOCK_DGRAM),
              record(path="@abstract\x01", ret=-2),
              record(ip=None, flags=NETMON_F_NO_ADDR),
              record(kind=NETMON_KIND_UDP_SEND, sock_type=socket.SOCK_DGRAM, packets=7),
              record(kind=NETMON_KIND_ACCEPT, flags=NETMON_F_NO_OWNER, src_ip="10.0.0.9",
                     src_port=4242, outcome=NETMON_OUTCOME_ESTABLISHED),
              record(outcome=NETMON_OUTCOME_FAILED, ret=-110, latency_us=2**31)):
        mon.inject(r)
    raw = bytearray(record(comm="badXX"))
    raw[raw.find(b"badXX") + 3] = 0xFF  # a command that is not UTF-8
    mon.inject(bytes(raw))
    evs = mon.events(kind="all")
    evs += [evs[0]._replace(destination_name="api.\u00e9xample.com",
                            destination_cname_chain=("a.example", "b\u2028.example"),
                            unit="x.service", container_id="c" * 64, ppid=1, exe="/usr/bin/\t"),
            evs[1]._replace(destination_cname_chain=()),
            evs[2]._replace(timestamp=dt.datetime(999, 1, 2, 3, 4, 5, 6, dt.timezone.utc))]
    assert len(evs) == 11
    assert events_json(evs) == json.dumps([e.to_dict() for e in evs])
    assert events_json([]) == "[]"


def test_json_answer_puts_raw_parts_in_as_they_are():
    obj = {"a": RawJSON("[1, 2]"), "b": {"7": RawJSON("{}"), "x": [None, True]}, "c": "\u00e9"}
    assert json_answer(obj) == json.dumps({"a": [1, 2], "b": {"7": {}, "x": [None, True]},
                                           "c": "\u00e9"})
