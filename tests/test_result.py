"""What happened to a connect attempt, the same on both backends (synthetic records, no
root): return_code is what connect() returned, error the failure's errno, result
ok/error/pending/unknown for the filters, top and the attempt counters; followers pass an
event on once its handshake's outcome is known, or after a bounded hold as pending."""
import time

import pytest

from netmon.filters import compile_filter
from netmon.monitor import Follower
from netmon.testing import record, synthetic_monitor

SYS, CG = 1, 2  # backends
PENDING, ESTABLISHED, FAILED = 1, 2, 3  # outcomes
NO_RESULT = 0x4
EINPROGRESS, ECONNREFUSED, ETIMEDOUT, ENOENT = 115, 111, 110, 2


def outcome(sock_id, out, ret=0, latency_us=40):
    return record(kind=3, sock_id=sock_id, outcome=out, ret=ret, latency_us=latency_us, pid=0)


def connect(pid, sock_id, **kw):
    return record(pid=pid, sock_id=sock_id, **kw)


# (what it is, its connect record, its outcome record or None) -> what the event says
CASES = [
    ("syscall blocking ok", dict(backend=SYS, outcome=ESTABLISHED), (ESTABLISHED, 0),
     (0, None, "established", "ok")),
    ("syscall blocking refused", dict(backend=SYS, ret=-ECONNREFUSED, outcome=FAILED),
     (FAILED, -ECONNREFUSED), (-ECONNREFUSED, "ECONNREFUSED", "refused", "error")),
    ("syscall non-blocking ok", dict(backend=SYS, ret=-EINPROGRESS, outcome=PENDING),
     (ESTABLISHED, 0), (-EINPROGRESS, None, "established", "ok")),
    ("syscall non-blocking refused", dict(backend=SYS, ret=-EINPROGRESS, outcome=PENDING),
     (FAILED, -ECONNREFUSED), (-EINPROGRESS, "ECONNREFUSED", "refused", "error")),
    ("syscall non-blocking pending", dict(backend=SYS, ret=-EINPROGRESS, outcome=PENDING),
     None, (-EINPROGRESS, "EINPROGRESS", "pending", "pending")),
    ("cgroup non-blocking ok", dict(backend=CG, ret=-EINPROGRESS, outcome=PENDING),
     (ESTABLISHED, 0), (-EINPROGRESS, None, "established", "ok")),
    ("cgroup non-blocking timeout", dict(backend=CG, ret=-EINPROGRESS, outcome=PENDING),
     (FAILED, -ETIMEDOUT), (-EINPROGRESS, "ETIMEDOUT", "timeout", "error")),
    ("cgroup blocking ok", dict(backend=CG, flags=NO_RESULT, outcome=PENDING),
     (ESTABLISHED, 0), (0, None, "established", "ok")),
    ("cgroup blocking refused", dict(backend=CG, flags=NO_RESULT, outcome=PENDING),
     (FAILED, -ECONNREFUSED), (-ECONNREFUSED, "ECONNREFUSED", "refused", "error")),
    ("cgroup blocking pending", dict(backend=CG, flags=NO_RESULT, outcome=PENDING), None,
     (None, None, "pending", "pending")),
    ("cgroup non-blocking closed mid-handshake",
     dict(backend=CG, ret=-EINPROGRESS, outcome=PENDING), (FAILED, -103),
     (-EINPROGRESS, "ECONNABORTED", "aborted", "error")),
    ("syscall unix missing", dict(backend=SYS, path="/nowhere", ret=-ENOENT), None,
     (-ENOENT, "ENOENT", None, "error")),
    ("cgroup unix", dict(backend=CG, path="/x", flags=NO_RESULT), None,
     (None, None, "unknown", "unknown")),
    ("syscall udp", dict(backend=SYS, sock_type=2), None, (0, None, None, "ok")),
    ("cgroup udp", dict(backend=CG, sock_type=2, flags=NO_RESULT), None,
     (None, None, "unknown", "unknown")),
]


@pytest.fixture(scope="module")
def mon():
    m = synthetic_monitor(256)
    for i, (_, conn, out, _) in enumerate(CASES):
        sock = 0x1000 * (i + 1)
        m.inject(connect(i + 1, sock, **conn))
        if out is not None:
            m.inject(outcome(sock, *out))
    return m


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_fields(mon, i):
    (ev,) = mon.events(pid=i + 1)
    assert (ev.return_code, ev.error, ev.outcome, ev.result) == CASES[i][3]


def pids(mon, **f):
    return {e.pid for e in mon.events(**f)}


def cases(pred):
    return {i + 1 for i, c in enumerate(CASES) if pred(c[3])}


@pytest.mark.parametrize("result", ["ok", "error", "pending", "unknown"])
def test_result_filter_is_what_happened(mon, result):
    assert pids(mon, result=result) == cases(lambda want: want[3] == result)


@pytest.mark.parametrize("name", ["ECONNREFUSED", "ETIMEDOUT", "ENOENT", "EINPROGRESS",
                                  "ECONNABORTED"])
def test_errno_filter_matches_the_error_field(mon, name):
    """Whichever of connect() and the handshake gave the errno; EINPROGRESS only while
    the handshake is pending."""
    assert pids(mon, result=name) == cases(lambda want: want[1] == name)
    assert pids(mon, result=name)


def test_result_error_no_longer_counts_every_non_blocking_connect(mon):
    nonblocking = {i + 1 for i, c in enumerate(CASES) if c[1].get("ret") == -EINPROGRESS}
    assert pids(mon, result="error") & nonblocking == cases(
        lambda want: want[0] == -EINPROGRESS and want[3] == "error")
    assert pids(mon, result="ok") & nonblocking == {3, 6}


def test_top_failures_and_errors_group_by_the_failure(mon):
    rows, _, matched = mon.top("error", 10)
    got = {ev.error: n for ev, n, failed in rows}
    assert got == {"ECONNREFUSED": 3, "ETIMEDOUT": 1, "ENOENT": 1, "ECONNABORTED": 1}
    assert matched == len(cases(lambda want: want[3] == "error"))
    (row,), _, _ = mon.top("command", 10)
    assert row[2] == matched  # failed: the errors only


def test_attempt_counters_count_what_happened(mon):
    counts = mon.attempts()
    assert counts == {("inet", "tcp", "ok"): 4, ("inet", "tcp", "ECONNREFUSED"): 3,
                      ("inet", "tcp", "ETIMEDOUT"): 1, ("inet", "tcp", "ECONNABORTED"): 1,
                      ("unix", "unix", "ENOENT"): 1, ("unix", "unix", "unknown"): 1,
                      ("inet", "udp", "ok"): 1, ("inet", "udp", "unknown"): 1}
    assert mon.stats()["handshakes_in_flight"] == 2  # the two still pending: not yet counted


def test_an_attempt_whose_outcome_cannot_join_is_counted_pending():
    m = synthetic_monitor(4)
    m.inject(connect(1, 0xA0, ret=-EINPROGRESS, outcome=PENDING))
    assert m.attempts() == {} and m.stats()["handshakes_in_flight"] == 1
    for pid in range(2, 7):  # the store (4 records) forgets the connect event
        m.inject(record(pid=pid, outcome=ESTABLISHED))
    m.inject(outcome(0xA0, FAILED, -ECONNREFUSED))  # still counted, by its outcome
    assert m.attempts() == {("inet", "tcp", "ok"): 5, ("inet", "tcp", "ECONNREFUSED"): 1}
    assert m.stats()["handshakes_in_flight"] == 0
    assert m.stats()["outcomes_lost"]["unmatched"] == 1

    m = synthetic_monitor(64)
    m.inject(connect(1, 0xB0, ret=-EINPROGRESS, outcome=PENDING))
    m.inject(connect(2, 0xB0, ret=-EINPROGRESS, outcome=PENDING))  # its address, reused
    assert m.attempts() == {("inet", "tcp", "pending"): 1}
    m.inject(outcome(0xB0, ESTABLISHED))
    assert m.attempts() == {("inet", "tcp", "pending"): 1, ("inet", "tcp", "ok"): 1}
    assert [e.result for e in m.events()] == ["pending", "ok"]


def test_syscall_connect_with_no_handshake_to_wait_for_is_counted_at_once():
    m = synthetic_monitor(16)
    m.inject(record(pid=1, sock_id=0xC0, ret=-114, outcome=FAILED))  # EALREADY
    m.inject(record(pid=2, ret=-EINPROGRESS, outcome=PENDING))  # no socket to join by
    assert m.attempts() == {("inet", "tcp", "EALREADY"): 1, ("inet", "tcp", "pending"): 1}
    assert m.stats()["handshakes_in_flight"] == 0


# ---- followers: an event once its outcome is known ----

def follower(m, hold=1.0, **filters):
    return Follower(m, 0, compile_filter(**filters), hold)


def test_follower_holds_a_pending_handshake_and_what_follows_it():
    m = synthetic_monitor(64)
    f = follower(m)
    m.inject(record(pid=1))
    m.inject(connect(2, 0xA0, ret=-EINPROGRESS, outcome=PENDING))
    m.inject(record(pid=3, path="/x"))
    assert [e.pid for e in f.next()] == [1]  # in order: 3 waits behind 2
    assert f.next() == [] and f.cursor == 1
    m.inject(outcome(0xA0, FAILED, -ECONNREFUSED, latency_us=77))
    evs = f.next()
    assert [(e.pid, e.error, e.latency_us) for e in evs] == [(2, "ECONNREFUSED", 77),
                                                           (3, None, None)]
    assert f.cursor == 3
    assert m.stats()["follow_holds"] == {"held": 1, "expired": 0}


def test_hold_is_bounded_then_the_event_comes_as_pending():
    m = synthetic_monitor(64)
    f = follower(m, hold=0.2)
    m.inject(connect(1, 0xA0, ret=-EINPROGRESS, outcome=PENDING))
    m.inject(record(pid=2))
    assert f.next() == []
    time.sleep(0.25)
    assert [(e.pid, e.result, e.error) for e in f.next()] == [(1, "pending", "EINPROGRESS"),
                                                              (2, "ok", None)]
    assert m.stats()["follow_holds"] == {"held": 1, "expired": 1}
    old = synthetic_monitor(64)  # recorded longer ago than the hold: not waited for
    old.inject(connect(1, 0xA0, ret=-EINPROGRESS, outcome=PENDING, age=5))
    assert [e.result for e in follower(old).next()] == ["pending"]
    assert old.stats()["follow_holds"] == {"held": 0, "expired": 1}


def test_hold_zero_passes_events_on_at_once():
    m = synthetic_monitor(64)
    m.inject(connect(1, 0xA0, ret=-EINPROGRESS, outcome=PENDING))
    assert [e.result for e in follower(m, hold=0).next()] == ["pending"]
    assert m.stats()["follow_holds"] == {"held": 0, "expired": 0}
    with pytest.raises(ValueError):
        follower(m, hold=-1)


@pytest.mark.parametrize("result, shown", [("ok", [1]), ("error", [2, 3]),
                                           ("ECONNREFUSED", [2]), (None, [1, 2, 3])])
def test_a_result_filter_waits_for_what_the_attempt_becomes(result, shown):
    """A pending attempt may match later: it holds a filtered follower too, and then
    shows (or not) by its final result."""
    m = synthetic_monitor(64)
    f = follower(m, result=result)
    m.inject(connect(1, 0xA0, ret=-EINPROGRESS, outcome=PENDING))
    m.inject(connect(2, 0xB0, flags=NO_RESULT, backend=CG, outcome=PENDING))
    m.inject(record(pid=3, path="/x", ret=-ENOENT))
    assert f.next() == []
    m.inject(outcome(0xB0, FAILED, -ECONNREFUSED))
    assert f.next() == []  # 1 still holds
    m.inject(outcome(0xA0, ESTABLISHED))
    assert [e.pid for e in f.next()] == shown


def test_a_hold_does_not_wait_for_events_the_filter_excludes():
    m = synthetic_monitor(64)
    f = follower(m, pid=2)
    m.inject(connect(1, 0xA0, ret=-EINPROGRESS, outcome=PENDING))
    m.inject(record(pid=2))
    assert [e.pid for e in f.next()] == [2]


def test_follower_reports_a_gap_once():
    m = synthetic_monitor(4)
    f = follower(m, hold=0)
    for pid in range(1, 11):
        m.inject(record(pid=pid))
    assert [e.seq for e in f.next()] == [7, 8, 9, 10]
    assert f.gap == (1, 6) and f.missed == 6
    assert f.next() == [] and f.gap is None


def test_monitor_follow_yields_final_events():
    m = synthetic_monitor(64)
    m.inject(connect(1, 0xA0, ret=-EINPROGRESS, outcome=PENDING))
    m.inject(outcome(0xA0, ESTABLISHED, latency_us=5))
    (ev,) = list(m.follow(after_seq=0, timeout=0.1))
    assert (ev.return_code, ev.error, ev.outcome, ev.latency_us, ev.result) == (
        -EINPROGRESS, None, "established", 5, "ok")
    with pytest.raises(TypeError):
        next(m.follow(timeout=0.1, where=compile_filter(pid=1), pid=1))
