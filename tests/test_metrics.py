"""GET /metrics and /api/stats: Prometheus text that prometheus_client's own parser reads,
counters that agree with /api/stats, and connect-attempt counters that stay monotonic when
the store evicts. The last test counts real connects (root)."""
import json
import os
import tempfile
import time
import urllib.request

import pytest
from helpers import call, run_child, samples, scrape_app, start_netmon

import netmon
from netmon.testing import record, synthetic_monitor
from netmon.web import make_app


def attempts(s: dict) -> dict:
    return {tuple(dict(labels)[k] for k in ("family", "protocol", "result")): v
            for (name, labels), v in s.items() if name == "netmon_connect_attempts_total"}


def test_metrics_parse_and_agree_with_stats_after_eviction():
    mon = synthetic_monitor(capacity=8)
    for i in range(20):
        mon.inject(record(ret=-111 if i % 4 == 0 else 0, pid=i))
    mon.inject(record(path="/run/x.sock", ret=-2))
    mon.inject(record(ip="::1", sock_type=2, flags=0x4))  # the hook could not know
    mon.inject(record(kind=2, packets=5))  # a udp_send: not a connect attempt
    mon.inject(record(ret=-4095))  # no errno has this number
    app = make_app(mon)
    s = samples(scrape_app(app))
    assert attempts(s) == {("inet", "tcp", "ok"): 15, ("inet", "tcp", "ECONNREFUSED"): 5,
                           ("unix", "unix", "ENOENT"): 1, ("inet6", "udp", "unknown"): 1,
                           ("inet", "tcp", "other"): 1}
    stats = call(app, "GET", "/api/stats").body
    assert stats["evicted"] == 16 and stats["size"] == 8  # the counters outlive the store
    assert {(a["family"], a["protocol"], a["result"]): a["count"]
            for a in stats["connect_attempts"]} == attempts(s)
    for name, key in [("netmon_events_delivered_total", "delivered"),
                      ("netmon_events_captured_total", "captured"),
                      ("netmon_events_evicted_total", "evicted"),
                      ("netmon_store_events", "size"), ("netmon_store_capacity", "capacity")]:
        assert s[(name, frozenset())] == stats[key], name
    for reason, n in stats["dropped"].items():
        assert s[("netmon_events_dropped_total", frozenset({("reason", reason)}))] == n
    info = [dict(labels) for (name, labels) in s if name == "netmon_build_info"]
    assert info == [{"version": netmon.__version__, "backend": "auto",
                     "libbpf_version": netmon._core.libbpf_version()}]
    assert ("netmon_poll_lag_seconds", frozenset()) not in s  # not running: no lag to report
    assert not any(name == "netmon_http_auth_failures_total" for name, _ in s)


def test_no_high_cardinality_labels():
    mon = synthetic_monitor()
    for i in range(50):
        mon.inject(record(pid=i, comm=f"c{i}", ip=f"10.0.{i}.1", port=1000 + i))
    labels = {k for (_, ls) in samples(scrape_app(make_app(mon))) for k, _ in ls}
    assert labels <= {"family", "protocol", "result", "reason", "version", "libbpf_version",
                      "backend", "outcome", "le", "program", "id",  # kernel: a few programs
                      "implementation", "major", "minor", "patchlevel"}  # python_info


def test_attempt_table_overflows_into_other_without_losing_counts():
    mon = synthetic_monitor(capacity=4)
    for fam in range(100, 500):  # 400 distinct (family, protocol, ret) keys
        mon.inject(record(family=fam, ip=None))
    counts = mon.attempts()
    assert sum(counts.values()) == 400
    assert counts[("other", "other", "other")] > 0  # past the table's 256 slots
    mon.inject(record(family=499, ip=None))
    assert sum(mon.attempts().values()) == 401


def test_http_counters_come_from_server_stats():
    http = {"auth_failures": 7, "connections_refused": 2, "answers_cut": 1}
    app = make_app(synthetic_monitor(), server_stats=lambda: dict(http))
    s = samples(scrape_app(app))
    assert s[("netmon_http_auth_failures_total", frozenset())] == 7
    assert s[("netmon_http_connections_refused_total", frozenset())] == 2
    assert s[("netmon_http_answers_cut_total", frozenset())] == 1
    assert call(app, "GET", "/api/stats").body["http"] == http


def test_stats_reports_run_counts_only_when_the_kernel_counts(monkeypatch, tmp_path):
    from netmon.web import stats

    class Probed:
        def __init__(self, mon):
            self._mon = mon

        def program_stats(self):
            return {"netmon_connect_enter": {"id": 9, "run_cnt": 0, "run_time_ns": 0}}

        def __getattr__(self, name):
            return getattr(self._mon, name)

    app = make_app(Probed(synthetic_monitor()))
    sysctl = tmp_path / "bpf_stats_enabled"
    monkeypatch.setattr(stats, "BPF_STATS_SYSCTL", str(sysctl))
    sysctl.write_text("0\n")
    body = call(app, "GET", "/api/stats").body
    assert body["bpf_stats_enabled"] is False
    assert body["programs"] == {"netmon_connect_enter": {"id": 9, "run_cnt": None,
                                                         "run_time_ns": None}}
    sysctl.write_text("1\n")
    body = call(app, "GET", "/api/stats").body
    assert body["programs"]["netmon_connect_enter"]["run_cnt"] == 0


# ---- real connects through the netmon command (root) ----

@pytest.fixture(scope="module")
def server():
    proc, port, _ = start_netmon("--backend", "syscall")  # exact results to count
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.mark.bpf
def test_metrics_count_real_connects_and_match_stats(server):
    """Unix connects to a missing path (ENOENT): rare on a host, so the counter's growth
    can be pinned between what the store saw. Each scrape is bracketed by two stats reads:
    other processes may connect meanwhile."""
    key = ("unix", "unix", "ENOENT")
    missing = os.path.join(tempfile.mkdtemp(), "nobody-listens")
    before = json.loads(get(server + "/api/stats"))
    m1 = samples(get(server + "/metrics"))
    mid1 = json.loads(get(server + "/api/stats"))
    ops = [{"family": "unix", "addr": missing, "repeat": 5}]
    pid = run_child("nm-metrics", ops)["pid"]
    for _ in range(200):  # the poll loop delivers within tens of ms
        page = json.loads(get(server + f"/api/events?pid={pid}"))
        if page["count"] == 5:
            break
        time.sleep(0.05)
    assert [e["error"] for e in page["events"]] == ["ENOENT"] * 5
    mid2 = json.loads(get(server + "/api/stats"))
    m2 = samples(get(server + "/metrics"))
    after = json.loads(get(server + "/api/stats"))

    for s, lo, hi in ((m1, before, mid1), (m2, mid2, after)):
        assert lo["delivered"] <= s[("netmon_events_delivered_total", frozenset())] <= \
            hi["delivered"]
        assert lo["evicted"] <= s[("netmon_events_evicted_total", frozenset())] <= hi["evicted"]
        got = sum(attempts(s).values())
        assert sum(a["count"] for a in lo["connect_attempts"]) <= got <= \
            sum(a["count"] for a in hi["connect_attempts"])
        assert s[("netmon_store_capacity", frozenset())] == after["capacity"]
        assert s[("netmon_poll_lag_seconds", frozenset())] >= 0

    def enoent_between(a, b):  # unix ENOENT connect events with a < seq <= b
        page = json.loads(get(server + f"/api/events?family=unix&result=ENOENT&after={a}"
                                       "&limit=10000"))
        return sum(1 for e in page["events"] if e["seq"] <= b)

    if after["last_seq"] - after["size"] > before["last_seq"]:
        pytest.skip("a flood of connects elsewhere wrapped the store during the test")
    grew = attempts(m2).get(key, 0) - attempts(m1).get(key, 0)
    assert 5 <= enoent_between(mid1["last_seq"], mid2["last_seq"]) <= grew <= \
        enoent_between(before["last_seq"], after["last_seq"])


def test_a_tcp_attempt_is_counted_when_its_handshake_ends():
    """The result label is what happened (the same on both backends), so a non-blocking
    connect is counted once its outcome arrives, and is in flight until then."""
    mon = synthetic_monitor()
    app = make_app(mon)
    mon.inject(record(sock_id=0xA0, ret=-115, outcome=1))  # syscall, non-blocking
    mon.inject(record(sock_id=0xB0, flags=0x4, outcome=1, backend=2))  # cgroup, blocking
    s = samples(scrape_app(app))
    assert attempts(s) == {}
    assert s[("netmon_connect_attempts_in_flight", frozenset())] == 2
    mon.inject(record(kind=3, sock_id=0xA0, outcome=3, ret=-111, pid=0))
    mon.inject(record(kind=3, sock_id=0xB0, outcome=2, pid=0))
    s = samples(scrape_app(app))
    assert attempts(s) == {("inet", "tcp", "ECONNREFUSED"): 1, ("inet", "tcp", "ok"): 1}
    assert s[("netmon_connect_attempts_in_flight", frozenset())] == 0
    assert call(app, "GET", "/api/stats").body["handshakes_in_flight"] == 0
