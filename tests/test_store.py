"""The C store and record decoding, fed synthetic records (no root, no BPF)."""
import datetime as dt
import socket
import threading
import time

import pytest
from helpers import call

from netmon import Event, Monitor, _core
from netmon.event import rfc3339, to_datetime, wall_offset_ns
from netmon.testing import RECORD, now_ns, record, synthetic_monitor
from netmon.web import make_app
from netmon.web.limits import MAX_DURATION


def seqs(events):
    return [e.seq for e in events]


def test_record_layout_matches_extension():
    assert _core.RECORD_SIZE == RECORD.size == 128


def test_sequence_numbers_start_at_one_and_rise():
    m = synthetic_monitor(8)
    for port in range(5):
        m.inject(record(port=port))
    evs = m.events()
    assert seqs(evs) == [1, 2, 3, 4, 5]
    assert [e.port for e in evs] == [0, 1, 2, 3, 4]


def test_wraparound_overwrites_oldest_and_counts_evictions():
    m = synthetic_monitor(4)
    for port in range(10):
        m.inject(record(port=port))
    evs = m.events()
    assert seqs(evs) == [7, 8, 9, 10]
    assert [e.port for e in evs] == [6, 7, 8, 9]
    st = m.stats()
    assert (st["evicted"], st["size"], st["capacity"], st["delivered"]) == (6, 4, 4, 10)


def test_malformed_record_is_counted_not_stored():
    m = synthetic_monitor(4)
    m.inject(record()[:100])
    m.inject(b"")
    assert m.stats()["malformed"] == 2
    assert m.events() == []


def test_short_connect_records_are_stored_with_a_zero_tail():
    """The cgroup hooks put an inet connect on the ring cut short after its address (8
    bytes of it for IPv4, 16 for IPv6): stored as the full record with the rest zero, even
    over a slot whose last record had a source; any other short record is malformed."""
    addr_at = _core.RECORD_FIELDS["addr"][0]
    m = synthetic_monitor(1)
    m.inject(record(ip="10.0.0.1", src_ip="10.0.0.2", src_port=4242))  # fills the one slot
    m.inject(record(ip="10.1.2.3", port=53, pid=7, src_ip="10.0.0.9",
                    src_port=999)[:addr_at + 8])
    (e,) = m.events()
    assert (e.ip, e.port, e.pid, e.source_ip, e.source_port) == ("10.1.2.3", 53, 7, None, None)
    m.inject(record(ip="2001:db8::1", port=443, src_ip="2001:db8::2",
                    src_port=999)[:addr_at + 16])
    (e,) = m.events()
    assert (e.ip, e.port, e.source_ip, e.source_port) == ("2001:db8::1", 443, None, None)
    assert m.stats()["malformed"] == 0
    for kind in (_core.NETMON_KIND_TCP_OUTCOME, _core.NETMON_KIND_ACCEPT):
        m.inject(record(kind=kind, sock_id=1)[:addr_at + 16])
    m.inject(record()[:addr_at + 12])
    assert m.stats()["malformed"] == 3
    assert m.events()[0].ip == "2001:db8::1"


def test_pid_and_comm_filters():
    m = synthetic_monitor(64)
    for i in range(12):
        m.inject(record(pid=100 + i % 3, comm=f"cmd{i % 2}"))
    assert m.count(pid=101) == 4
    assert m.count(command="cmd1") == 6
    assert m.count(pid=101, command="cmd1") == 2  # i = 1, 7
    assert {e.pid for e in m.events(pid=102)} == {102}
    assert m.count(command="cmd") == 0  # exact match, not a prefix
    assert m.count(pid=999) == 0


def test_limit_returns_newest_oldest_first():
    m = synthetic_monitor(64)
    for i in range(10):
        m.inject(record(port=i))
    evs, matched = m.query(limit=3)
    assert [e.port for e in evs] == [7, 8, 9]
    assert matched == 10


def test_window_boundaries():
    m = synthetic_monitor(64)
    for age in (120, 61, 59.5, 30, 1):
        m.inject(record(age=age, port=int(age)))
    assert m.count(since=dt.timedelta(seconds=60)) == 3
    assert [e.port for e in m.events(since=dt.timedelta(seconds=60))] == [59, 30, 1]
    assert m.count(since=dt.timedelta(seconds=3600)) == 5
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=45)
    assert [e.port for e in m.events(since=since)] == [30, 1]
    assert [e.port for e in m.events(until=dt.timedelta(seconds=60))] == [120, 61]


def test_window_query_does_not_see_records_outside_it():
    """Window queries binary-search the ring's rising timestamps and scan only the window.
    An out-of-order record planted before the window (ring order) but stamped inside it
    (time) proves it: a full scan would count it, the window query does not."""
    m = synthetic_monitor(64)
    now = now_ns()
    m.inject(record(ts_ns=now - 5 * 10**9, pid=3))
    for i in range(10):
        m.inject(record(ts_ns=now - (100 - i) * 10**9, pid=1))
    for i in range(10):
        m.inject(record(ts_ns=now - (10 - i) * 10**9, pid=2))
    assert m.count(pid=3) == 1
    assert m.count(since=dt.timedelta(seconds=50)) == 10
    assert m.count(pid=3, since=dt.timedelta(seconds=50)) == 0


def test_latest_per_pid():
    m = synthetic_monitor(256)
    for i in range(30):
        m.inject(record(pid=10 + i % 3, port=i))
    m.inject(record(pid=99, port=1000))
    per_pid, truncated = m.latest_per_pid(limit=4)
    assert truncated is True
    assert sorted(per_pid) == [10, 11, 12, 99]
    assert [e.port for e in per_pid[10]] == [18, 21, 24, 27]
    assert [e.port for e in per_pid[99]] == [1000]
    only, truncated = m.latest_per_pid(limit=100, pid=11)
    assert list(only) == [11] and len(only[11]) == 10 and truncated is False


def test_after_seq_pages_without_repeat_or_skip_while_evicting():
    m = synthetic_monitor(16)
    for i in range(10):
        m.inject(record(port=i))
    seen, last = [], 0
    for round_ in range(6):
        evs, _ = m.query(after_seq=last, limit=4, newest=False)
        seen += seqs(evs)
        last = evs[-1].seq if evs else last
        for i in range(3):
            m.inject(record(port=100 + round_ * 3 + i))
    rest, _ = m.query(after_seq=last, newest=False)
    seen += seqs(rest)
    assert seen == list(range(1, 29))


def test_after_seq_older_than_store_starts_at_oldest_held():
    m = synthetic_monitor(4)
    for i in range(10):
        m.inject(record(port=i))
    evs, _ = m.query(after_seq=2, newest=False)
    assert seqs(evs) == [7, 8, 9, 10]


def test_follow_yields_new_events_only():
    m = synthetic_monitor(64)
    m.inject(record(port=1))

    def later():
        time.sleep(0.05)
        m.inject(record(port=2))
        m.inject(record(port=3))

    threading.Thread(target=later).start()
    got = [e.port for e in m.follow(timeout=0.5)]
    assert got == [2, 3]
    assert [e.port for e in m.follow(after_seq=0, timeout=0.05)] == [1, 2, 3]


def test_concurrent_push_and_query():
    m = synthetic_monitor(1000)
    n_threads, per_thread = 4, 5000
    errors = []

    def push(t):
        for i in range(per_thread):
            m.inject(record(pid=t + 1, port=i % 65536))

    def query():
        try:
            for _ in range(200):
                evs = m.events(limit=50)
                s = seqs(evs)
                assert s == sorted(s) and len(set(s)) == len(s)
                for e in evs:  # a torn record would mix fields of two records
                    assert e.tid == e.pid and e.destination == f"127.0.0.1:{e.port}"
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=push, args=(t,)) for t in range(n_threads)]
    threads += [threading.Thread(target=query) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = m.stats()
    assert st["delivered"] == n_threads * per_thread
    assert st["evicted"] == n_threads * per_thread - 1000
    assert sum(m.count(pid=p) for p in range(1, n_threads + 1)) == 1000


@pytest.mark.parametrize("kw, expect", [
    (dict(ip="10.1.2.3", port=443), dict(family=2, destination="10.1.2.3:443", ip="10.1.2.3",
                                         port=443, protocol="TCP", socket_type="STREAM")),
    (dict(ip="2001:db8::1", port=53, sock_type=2),
     dict(family=10, destination="[2001:db8::1]:53", ip="2001:db8::1", port=53,
          protocol="UDP", socket_type="DGRAM")),
    (dict(path="/run/app.sock"), dict(family=1, destination="/run/app.sock", ip=None,
                                      port=None, protocol="UNIX", truncated=False)),
    (dict(path="@bus"), dict(family=1, destination="@bus", protocol="UNIX")),
    (dict(path="/" + "x" * 100), dict(destination="/" + "x" * (_core.ADDR_LEN - 1),
                                      truncated=True)),
    (dict(ip=None, family=16, sock_type=3, protocol=0),
     dict(family=16, destination=None, ip=None, port=None, socket_type="RAW", protocol=None)),
    (dict(ip="127.0.0.1", sock_type=0), dict(socket_type=None, protocol=None)),
])
def test_decoding_every_family(kw, expect):
    m = synthetic_monitor(4)
    m.inject(record(**kw))
    (ev,) = m.events()
    for k, v in expect.items():
        assert getattr(ev, k) == v, k


def test_decoding_identity_and_errors():
    m = synthetic_monitor(4)
    m.inject(record(pid=4242, tid=4243, uid=1001, comm="curl", cgroup_id=77, ret=-111))
    m.inject(record(ret=0, port=443))
    bad, ok = m.events()
    assert (bad.pid, bad.tid, bad.uid, bad.command, bad.cgroup_id) == (4242, 4243, 1001, "curl", 77)
    assert (bad.return_code, bad.error) == (-111, "ECONNREFUSED")
    assert (ok.return_code, ok.error, ok.service) == (0, None, "HTTPS")
    d = ok.to_dict()
    assert d["timestamp"] == d["wall_time"] == rfc3339(ok.timestamp)
    assert d["destination_port"] == 443 and d["address_family"] == socket.AF_INET


def test_wall_clock_conversion():
    off = wall_offset_ns()
    real_now = time.time_ns()
    boot_now = _core.boot_ns()
    assert abs((boot_now + off) - real_now) < 5_000_000  # same instant within 5 ms
    m = synthetic_monitor(4)
    assert abs((m.clock_ns() + m.wall_offset_ns()) - real_now) < 5_000_000
    m.inject(record(ts_ns=m.clock_ns()))
    (ev,) = m.events()
    assert ev.timestamp.tzinfo == dt.timezone.utc
    assert abs(ev.timestamp.timestamp() - real_now / 1e9) < 0.005
    assert to_datetime(1_700_000_000_123_456_789) == dt.datetime(
        2023, 11, 14, 22, 13, 20, 123456, tzinfo=dt.timezone.utc)
    assert rfc3339(to_datetime(1_700_000_000_123_456_789)) == "2023-11-14T22:13:20.123456Z"


def test_event_is_immutable():
    m = synthetic_monitor(4)
    m.inject(record())
    (ev,) = m.events()
    assert isinstance(ev, Event)
    with pytest.raises(AttributeError):
        ev.pid = 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        synthetic_monitor(0)
    with pytest.raises(ValueError):
        from netmon import Monitor
        Monitor(capacity=16, ringbuf_bytes=5000)
    m = synthetic_monitor(4)
    with pytest.raises(ValueError):
        m.count(command="x" * 16)
    with pytest.raises(ValueError):
        m.count(since=dt.datetime(2026, 1, 1))  # naive


def test_tcp_outcome_updates_its_connect_event_in_either_order():
    m = synthetic_monitor(64)
    # non-blocking: the connect event first (pending), its outcome later
    m.inject(record(pid=1, sock_id=0xA0, ret=-115, outcome=1))
    m.inject(record(kind=3, sock_id=0xA0, outcome=2, latency_us=42, pid=0))
    # blocking: the handshake ends inside connect(), so the outcome comes first
    m.inject(record(kind=3, sock_id=0xB0, outcome=3, ret=-111, latency_us=7, pid=0))
    m.inject(record(pid=2, sock_id=0xB0, ret=-111, outcome=3))
    # cgroup backend: the hook cannot know the result; the outcome supplies it
    m.inject(record(pid=3, sock_id=0xC0, outcome=1, backend=2, flags=0x4))
    m.inject(record(kind=3, sock_id=0xC0, outcome=3, ret=-110, latency_us=3000000, pid=0))
    # UDP under the cgroup backend: unknown, never invented
    m.inject(record(pid=4, sock_type=2, backend=2, flags=0x4))
    a, b, c, d = m.events()
    assert (a.pid, a.return_code, a.outcome, a.latency_us) == (1, -115, "established", 42)
    assert (b.pid, b.return_code, b.outcome, b.latency_us) == (2, -111, "refused", 7)
    assert (c.pid, c.return_code, c.error, c.outcome, c.backend) == (
        3, -110, "ETIMEDOUT", "timeout", "cgroup")
    assert (d.return_code, d.error, d.outcome, d.protocol) == (None, None, "unknown", "UDP")
    assert m.stats()["delivered"] == 4  # outcomes are updates, not events
    assert m.stats()["outcomes_lost"]["unmatched"] == 0


def test_outcome_for_a_connect_never_seen_is_counted():
    m = synthetic_monitor(8)
    m.inject(record(kind=3, sock_id=0xD0, outcome=2, pid=0))
    m.inject(record(kind=3, sock_id=0xD0 + (1 << 20), outcome=2, pid=0))
    m.inject(record(kind=3, sock_id=0, outcome=2, pid=0))
    assert m.events() == []
    assert m.stats()["outcomes_lost"]["unmatched"] >= 1


@pytest.mark.parametrize("dest, expect", [
    ("10.0.0.0/8", [1, 2]),
    ("10.1.0.0/16", [1]),
    ("10.1.2.3", [1]),
    ("10.0.0.0/7", [1, 2, 3]),  # 11.x is inside /7, 12.x is not
    ("0.0.0.0/0", [1, 2, 3, 4]),
    ("2001:db8::/32", [5, 6]),
    ("2001:db8:0:1::/64", [6]),
    ("::1/128", [7]),
    ("/run/", [8]),
    ("/run/app.sock", [8]),
    ("@bus", [9]),
])
def test_dest_filter_cidr_edges(dest, expect):
    m = synthetic_monitor(64)
    for pid, ip in [(1, "10.1.2.3"), (2, "10.255.255.255"), (3, "11.0.0.1"), (4, "12.0.0.1"),
                    (5, "2001:db8::1"), (6, "2001:db8:0:1::5"), (7, "::1")]:
        m.inject(record(pid=pid, ip=ip))
    m.inject(record(pid=8, path="/run/app.sock"))
    m.inject(record(pid=9, path="@bus-x"))
    assert [e.pid for e in m.events(dest=dest)] == expect


def test_result_family_protocol_port_kind_filters_combine():
    m = synthetic_monitor(64)
    m.inject(record(pid=1, ret=-111, port=80))
    m.inject(record(pid=2, ret=0, port=80))
    m.inject(record(pid=3, ret=-111, port=443, ip="::1"))
    m.inject(record(pid=4, ret=0, port=53, sock_type=2))
    m.inject(record(pid=5, kind=2, packets=9, port=53, sock_type=2))
    pids = lambda **f: [e.pid for e in m.events(**f)]  # noqa: E731
    assert pids(result="ECONNREFUSED") == [1, 3]
    assert pids(result="error") == [1, 3]
    assert pids(result="ok") == [2, 4]
    assert pids(result="error", family="inet") == [1]
    assert pids(protocol="udp") == [4]
    assert pids(port=80, result="ok") == [2]
    assert pids(kind="udp_send") == [5]
    assert pids(kind=None, port=53) == [4, 5]
    (u,) = m.events(kind="udp_send")
    assert (u.kind, u.packets) == ("udp_send", 9)


@pytest.mark.parametrize("bad, param", [
    (dict(family="ipx"), "family"), (dict(protocol="tcpx"), "protocol"),
    (dict(port=70000), "port"), (dict(dest="10.0.0.0/33"), "dest"), (dict(dest="x"), "dest"),
    (dict(result="ENOTANERRNO"), "result"), (dict(pid=-1), "pid"), (dict(pid=True), "pid"),
    (dict(command=""), "command"), (dict(kind="tcp"), "kind"),
])
def test_bad_filters_name_the_parameter(bad, param):
    from netmon.filters import FilterError
    m = synthetic_monitor(4)
    with pytest.raises(FilterError) as ei:
        m.events(**bad)
    assert ei.value.param == param


def test_top_groups_counts_and_failures():
    m = synthetic_monitor(256)
    m.inject(record(pid=3, comm="old", ip="10.0.0.3", port=80, age=120))
    for i in range(10):
        m.inject(record(pid=1, comm="curl", ip="10.0.0.1", port=443, ret=-111 if i < 3 else 0))
    for _ in range(5):
        m.inject(record(pid=2, comm="wget", ip="10.0.0.2", port=80))
    top, groups, matched = m.top("destination", 10, since=dt.timedelta(seconds=60))
    assert [(e.destination, n, f) for e, n, f in top] == [("10.0.0.1:443", 10, 3),
                                                          ("10.0.0.2:80", 5, 0)]
    assert (groups, matched) == (2, 15)
    assert [(e.command, n) for e, n, _ in m.top("command", 1)[0]] == [("curl", 10)]
    assert [(e.port, n) for e, n, _ in m.top("port", 10)[0]] == [(443, 10), (80, 6)]
    assert [(e.pid, n) for e, n, _ in m.top("pid", 10)[0]] == [(1, 10), (2, 5), (3, 1)]
    assert [(e.error, n, f) for e, n, f in m.top("error", 10)[0]] == [("ECONNREFUSED", 3, 3)]
    with pytest.raises(ValueError):
        m.top("nonsense", 10)


def test_windows_reaching_before_boot_hold_everything_since_boot():
    """On the kernel's own clock (no synthetic shift), a window or `since` longer than the
    host has been up is valid: it clamps to boot and holds everything; `until` before boot
    holds nothing. Fifty years is more than any uptime."""
    m = Monitor(capacity=16)  # the kernel's clock, as a real monitor's
    m.inject(record(ts_ns=_core.boot_ns() - 10**9, pid=5))
    long_ago = dt.timedelta(days=365 * 50)
    assert m.count(since=long_ago) == 1
    assert m.count(since=dt.datetime(1971, 1, 1, tzinfo=dt.timezone.utc)) == 1
    assert m.count(until=long_ago) == 0
    assert m.count(since=long_ago, until=dt.timedelta(0)) == 1
    app = make_app(m)
    reply = call(app, "POST", "/api/connection-summary", {"pid": 5, "duration": MAX_DURATION})
    assert reply.status == 200 and reply.body["total_attempts"] == 1
    reply = call(app, "GET", "/api/events", query="since=999999999h")
    assert reply.status == 200 and reply.body["count"] == 1
