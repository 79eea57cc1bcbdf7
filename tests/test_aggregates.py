"""Queries over stores larger than one scan chunk (the store's lock is released between
chunks), checked against answers computed here in Python from the records pushed; and
queries racing a writer that evicts under them. No root, no BPF."""
import collections
import threading
import time

from netmon.testing import now_ns, record, synthetic_monitor

CAPACITY, PUSHED = 5000, 12345  # several chunks of the store's scan, wrapped twice


def workload(n, start_ns, step_ns):
    """n records' fields: 37 pids, 5 commands, 50 destinations, some refused."""
    out = []
    for i in range(n):
        pid = 100 + i * 7 % 37
        out.append(dict(pid=pid, comm=f"c{pid % 5}", ip=f"10.0.{i % 50 // 10}.{i % 10}",
                        port=(80, 443)[i % 50 // 25], ret=-111 if i % 13 == 0 else 0,
                        ts_ns=start_ns + i * step_ns))
    return out


def filled(capacity=CAPACITY, pushed=PUSHED, step_ns=1_000_000):
    """A wrapped store and the fields of the records it holds, oldest first."""
    m = synthetic_monitor(capacity)
    recs = workload(pushed, now_ns() - pushed * step_ns, step_ns)
    for r in recs:
        m.inject(record(**r))
    return m, recs[-capacity:]


def dest(r):
    return f"{r['ip']}:{r['port']}"


def test_counts_and_lists_across_chunks_equal_python():
    m, held = filled()
    assert m.count() == CAPACITY
    assert m.count(pid=107) == sum(r["pid"] == 107 for r in held)
    assert m.count(command="c3") == sum(r["comm"] == "c3" for r in held)
    assert m.count(result="error") == sum(r["ret"] != 0 for r in held)
    newest = m.events(limit=3000, port=443)
    want = [r for r in held if r["port"] == 443][-3000:]
    assert [(e.pid, e.destination) for e in newest] == [(r["pid"], dest(r)) for r in want]
    first = PUSHED - CAPACITY  # the seq before the oldest held
    oldest, matched = m.query(limit=2500, newest=False, after_seq=first + 100, pid=111)
    want = [r for r in held[100:] if r["pid"] == 111]
    assert [e.seq - first - 1 for e in oldest][:3] == [
        i for i, r in enumerate(held) if i >= 100 and r["pid"] == 111][:3]
    assert (len(oldest), matched) == (len(want), len(want))
    per_pid, truncated = m.latest_per_pid(limit=40)
    by_pid = collections.defaultdict(list)
    for i, r in enumerate(held):
        by_pid[r["pid"]].append(first + 1 + i)
    assert {p: [e.seq for e in evs] for p, evs in per_pid.items()} == {
        p: s[-40:] for p, s in by_pid.items()}
    assert truncated


def python_top(held, key, first_seq, failed_only=False):
    """[(key, count, failed)] largest first, ties: the most recently seen first."""
    groups = {}
    for i, r in enumerate(held):
        failed = r["ret"] != 0
        if failed_only and not failed:
            continue
        g = groups.setdefault(key(r), [0, 0, 0])
        g[0] += 1
        g[1] += failed
        g[2] = first_seq + i
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], -kv[1][2]))
    return [(k, c, f) for k, (c, f, _) in ranked]


def test_top_across_chunks_equals_python():
    m, held = filled()
    first = PUSHED - CAPACITY + 1
    for by, key, render in (("destination", dest, lambda e: e.destination),
                            ("pid", lambda r: r["pid"], lambda e: e.pid),
                            ("command", lambda r: r["comm"], lambda e: e.command),
                            ("port", lambda r: r["port"], lambda e: e.port)):
        top, groups, matched = m.top(by, 7)
        want = python_top(held, key, first)
        assert [(render(e), n, f) for e, n, f in top] == want[:7], by
        assert (groups, matched) == (len(want), CAPACITY)
    top, groups, matched = m.top("error", 5)
    assert [(e.error, n, f) for e, n, f in top] == [("ECONNREFUSED", matched, matched)]
    assert matched == sum(r["ret"] != 0 for r in held)


def test_queries_racing_a_writer_that_evicts_under_them():
    """Scans give the lock up between chunks: records evicted meanwhile are skipped (a
    top group whose newest record went is left out), never read torn or twice."""
    m = synthetic_monitor(3000)
    stop, errors = threading.Event(), []
    recs = workload(3000, now_ns() - 10**9, 1000)

    def push():
        i = 0
        while not stop.is_set():
            r = dict(recs[i % 3000], ts_ns=now_ns())
            m.inject(record(**r))
            i += 1

    def query():
        try:
            for _ in range(30):
                top, groups, matched = m.top("destination", 0)
                assert sum(n for _, n, _ in top) == matched and len(top) == groups <= 50
                assert len({e.destination for e, _, _ in top}) == groups
                evs = m.events(limit=2000, pid=107)
                s = [e.seq for e in evs]
                assert s == sorted(set(s)) and all(e.pid == 107 for e in evs)
                per_pid, _ = m.latest_per_pid(limit=30)
                for p, evs in per_pid.items():
                    assert len(evs) <= 30 and all(e.pid == p for e in evs)
        except AssertionError as e:
            errors.append(e)

    for r in recs:  # full: from here on every push evicts
        m.inject(record(**r))
    writer = threading.Thread(target=push)
    writer.start()
    try:
        while not m.stats()["evicted"]:  # the writer runs
            time.sleep(0.001)
        readers = [threading.Thread(target=query) for _ in range(2)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    finally:
        stop.set()
        writer.join()
    assert not errors


# ---- rollups: per-second counts the consumer keeps, equal to a scan's answers ----

SEC = 10**9
CONNECT = 1


def both(store, *calls):
    """The store's answers to calls ((method, args, keywords) each) with the rollups,
    then scanning only: (rollups' answers, scan's); a top-N answer as top_key() says."""
    def answers():
        out = []
        for name, args, kw in calls:
            a = getattr(store, name)(*args, **kw)
            out.append(top_key(a) if name == "top" else a)
        return out

    store.use_rollups = True
    got = answers()
    store.use_rollups = False
    try:
        return got, answers()
    finally:
        store.use_rollups = True


def top_key(answer):
    rows, groups, matched = answer
    return [(r[0], r[3], r[12], r[13], n, f) for r, n, f in rows], groups, matched


def assert_rollups_equal_scans(m, base, secs, pids=(), comms=()):
    """Counts and top-N over many windows, ends on and between second boundaries."""
    st = m._store
    edges = [None] + [base + s * SEC + frac for s in range(-1, secs + 2)
                      for frac in (0, 1, SEC // 3)]
    windows = [(a, b) for a in edges[::4] for b in edges[1::5] if a is None or b is None
               or a <= b] + [(base + SEC // 2, base + SEC // 2 + 1)]
    used = 0
    for since, until in windows:
        q = dict(kind=CONNECT, since_ns=since, until_ns=until)
        for who in [{}] + [{"pid": p} for p in pids] + [{"comm": c} for c in comms]:
            got, want = both(st, ("count", (), {**q, **who}))
            assert got == want, (since, until, who)
            used += got[0]
        for by in ("destination", "command", "pid"):
            got, want = both(st, ("top", (by, 5), q))
            assert got == want, (since, until, by)
    assert used, "the windows held records"


def spread(m, base, secs, per_sec, **kw):
    """per_sec records a second over secs seconds from base: 7 pids, 3 commands, 11
    destinations, one in 9 refused."""
    i = 0
    for s in range(secs):
        for j in range(per_sec):
            pid = 200 + i % 7
            m.inject(record(pid=pid, comm=f"r{i % 3}", ip=f"10.9.0.{i % 11}",
                            ret=-111 if i % 9 == 0 else 0,
                            ts_ns=base + s * SEC + j * (SEC // per_sec), **kw))
            i += 1


def test_rollups_equal_scans_with_windows_ending_mid_second_and_an_evicted_head():
    m = synthetic_monitor(1000)  # 40 s of 37 a second: wrapped, the oldest second partial
    base = now_ns() // SEC * SEC - 60 * SEC
    spread(m, base, 40, 37)
    assert m.stats()["evicted"] == 40 * 37 - 1000
    assert m._store.counters()["rollup_buckets"] >= 27
    assert_rollups_equal_scans(m, base, 40, pids=(200, 203, 999), comms=("r1", "zz"))
    # and to what was pushed: the last 1000 records, pid 203's
    held = [200 + i % 7 for i in range(40 * 37)][-1000:]
    assert m._store.count(kind=CONNECT, pid=203) == held.count(203)


def test_rollups_follow_tcp_outcomes_and_stamps_that_go_back():
    """A handshake's outcome turns a stored attempt failed (or not) after its second was
    rolled up; a record stamped before the newest stays in the newest second."""
    m = synthetic_monitor(4096)
    base = now_ns() // SEC * SEC - 30 * SEC
    for i in range(200):
        ts = base + i * SEC // 10 - (3 * SEC if i % 17 == 0 else 0)  # some go back
        m.inject(record(pid=300 + i % 4, comm="tcp", ip="10.8.0.1", port=80 + i % 3,
                        sock_id=(1 + i) << 8, ret=-115, flags=0, outcome=1, ts_ns=ts))
    for i in range(0, 200, 3):  # outcomes: failed, established
        m.inject(record(kind=3, sock_id=(1 + i) << 8, outcome=3 if i % 2 else 2,
                        ret=-111 if i % 2 else 0))
    assert sum(f for _, _, f in m.top("destination", 3)[0]) == 33  # i = 3, 9, 15 ...
    assert_rollups_equal_scans(m, base, 21, pids=(301,), comms=("tcp",))


def test_rollups_bounded_give_up_tables_and_scan_instead():
    """Past the memory bound a bucket's table is given up (counted) and that second is
    scanned: the answers stay equal."""
    m = synthetic_monitor(131072)  # bound: 4 MiB; a table of 64k destinations is 4.5 MiB
    base = now_ns() // SEC * SEC - 10 * SEC
    for i in range(131072):
        m.inject(record(pid=400 + i % 5, ip=f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}",
                        ts_ns=base + i * (3 * SEC // 131072)))
    c = m._store.counters()
    assert c["rollup_tables_given_up"] > 0 and c["rollup_bytes"] <= 4 << 20
    st = m._store
    for since in (None, base + SEC // 2, base + SEC + 5):
        q = dict(kind=CONNECT, since_ns=since)
        got, want = both(st, ("top", ("destination", 3), q), ("count", (), {"pid": 401, **q}),
                         ("top", ("pid", 9), q))
        assert got == want


def test_rollups_beyond_the_buckets_kept_are_scanned():
    m = synthetic_monitor(6000)
    base = now_ns() // SEC * SEC - 5000 * SEC
    spread(m, base, 4500, 1)  # more seconds than buckets kept
    assert m._store.counters()["rollup_buckets"] == 4096
    st = m._store
    for since in (None, base + 100 * SEC, base + 500 * SEC + 1):
        q = dict(kind=CONNECT, since_ns=since)
        got, want = both(st, ("count", (), q), ("count", (), {"pid": 202, **q}),
                         ("top", ("command", 3), q))
        assert got == want
    assert st.count(kind=CONNECT) == 4500


def test_rollups_equal_scans_with_runs_of_one_key():
    """A process connecting to one place in a loop: runs of records with the same keys
    (counted into the entries the run's first one found) across second boundaries, with
    refused ones and TCP outcomes turning some failed after they were counted."""
    m = synthetic_monitor(4096)
    base = now_ns() // SEC * SEC - 30 * SEC
    for i in range(800):
        k = i // 13  # runs of 13 (and shorter ones where a second starts)
        m.inject(record(pid=500 + k % 3, comm=f"l{k % 2}", ip=f"10.7.0.{k % 5}",
                        port=80 + k % 2, sock_id=(1 + i) << 8, ret=-111 if i % 7 == 0 else -115,
                        flags=0, outcome=1, ts_ns=base + i * SEC // 40))
    for i in range(0, 800, 5):
        m.inject(record(kind=3, sock_id=(1 + i) << 8, outcome=3 if i % 2 else 2,
                        ret=-111 if i % 2 else 0))
    assert_rollups_equal_scans(m, base, 20, pids=(501,), comms=("l0",))


def test_rollups_runs_of_one_key_in_a_given_up_table():
    """Repeated destinations past the memory bound: the destination table is given up
    and its repeats are not counted into anything stale."""
    m = synthetic_monitor(131072)  # bound 4 MiB: 65,536 destinations in one second exceed it
    base = now_ns() // SEC * SEC - 10 * SEC
    for i in range(131072):
        j = i >> 1
        m.inject(record(pid=400 + i // 7 % 5, ip=f"10.{j >> 16}.{j >> 8 & 255}.{j & 255}",
                        ts_ns=base + i * (SEC // 131072)))
    assert m._store.counters()["rollup_tables_given_up"] > 0
    st = m._store
    for since in (None, base + SEC // 3):
        q = dict(kind=CONNECT, since_ns=since)
        got, want = both(st, ("top", ("destination", 3), q), ("count", (), {"pid": 401, **q}),
                         ("top", ("pid", 9), q), ("top", ("command", 2), q))
        assert got == want


def test_top_cache_slides_with_the_window_and_equals_scans():
    """Top-N over many seconds keeps the merged closed seconds between queries and slides
    them as records arrive, the head is evicted and outcomes turn closed seconds' attempts
    failed: after every step, each answer equals a scan's."""
    m = synthetic_monitor(2000)  # 60 records a second: the store holds ~33 s
    st = m._store
    base = now_ns() // SEC * SEC - 80 * SEC
    i = 0
    for s in range(70):
        for j in range(60):
            m.inject(record(pid=600 + i % 11, comm=f"w{i % 4}", ip=f"10.6.{i % 3}.{i % 17}",
                            sock_id=(1 + i) << 8, ret=-111 if i % 23 == 0 else -115, flags=0,
                            outcome=1, ts_ns=base + s * SEC + j * (SEC // 60)))
            i += 1
        if s % 3 == 0 and s > 3:  # an outcome for a connect of a second long closed
            old = i - 150
            m.inject(record(kind=3, sock_id=(1 + old) << 8, outcome=3, ret=-111))
        if s < 5:
            continue
        now = base + (s + 1) * SEC
        for since, until in ((None, None), (now - 20 * SEC, None), (now - 9 * SEC // 2, None),
                             (now - 30 * SEC + 1, now - 2 * SEC - SEC // 3)):
            q = dict(kind=CONNECT, since_ns=since, until_ns=until)
            for by, limit in (("destination", 4), ("pid", 3), ("command", 0)):
                got, want = both(st, ("top", (by, limit), q))
                assert got == want, (s, since, until, by)
    assert m.stats()["evicted"] > 0
    assert sum(f for _, _, f in m.top("destination", 0)[0]) > 0
