"""What fleets scrape: /metrics passes promtool's checks, carries netmon's own process
metrics, the programs' kernel cost, the TCP handshake histogram (counted in C as outcomes
arrive) and the HTTP refusals; a real Prometheus server scrapes a real netmon and answers
for a connect counter and the histogram through its query API."""
import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from helpers import child_env, free_port, http, netmon_command, samples, scrape_app, start
from netmon._core import NETMON_KIND_TCP_OUTCOME, NETMON_OUTCOME_ESTABLISHED, NETMON_OUTCOME_FAILED

import netmon
from netmon.testing import record, synthetic_monitor
from netmon.web import make_app
from netmon.web.guard import Guard


def outcome(latency_us, failed=False, sock_id=7):
    return record(kind=NETMON_KIND_TCP_OUTCOME, sock_id=sock_id, latency_us=latency_us,
                  outcome=NETMON_OUTCOME_FAILED if failed else NETMON_OUTCOME_ESTABLISHED,
                  ret=-111 if failed else 0)


class WithPrograms:
    """A synthetic monitor that reports two attached programs and a poll lag, as a
    running one would."""

    def __init__(self, mon):
        self._mon = mon

    def stats(self):
        return {**self._mon.stats(), "poll_lag_seconds": 0.01}

    def program_stats(self):
        return {"netmon_connect_enter": {"id": 31, "run_cnt": 10, "run_time_ns": 2500},
                "netmon_connect_exit": {"id": 32, "run_cnt": 10, "run_time_ns": 7500}}

    def __getattr__(self, name):
        return getattr(self._mon, name)


@pytest.fixture
def bpf_stats_on(monkeypatch, tmp_path):
    from netmon.web import stats
    sysctl = tmp_path / "bpf_stats_enabled"
    sysctl.write_text("1\n")
    monkeypatch.setattr(stats, "BPF_STATS_SYSCTL", str(sysctl))
    return sysctl


def test_handshake_histogram_buckets_every_outcome_exactly():
    mon = synthetic_monitor(capacity=2)  # evictions do not touch it
    for lat in (10, 50, 51, 3000, 6_000_000):
        mon.inject(outcome(lat))
    mon.inject(outcome(120, failed=True, sock_id=0))  # unjoinable: still a timed handshake
    mon.inject(record(kind=NETMON_KIND_TCP_OUTCOME, sock_id=9, latency_us=5))  # no outcome
    s = samples(scrape_app(make_app(mon)))

    def bucket(o, le):
        return s[("netmon_tcp_handshake_seconds_bucket",
                  frozenset({("outcome", o), ("le", le)}))]
    assert [bucket("established", le) for le in ("5e-05", "0.0001", "0.005", "5", "+Inf")] == \
        [2, 3, 4, 4, 5]
    assert s[("netmon_tcp_handshake_seconds_count", frozenset({("outcome", "established")}))] == 5
    assert s[("netmon_tcp_handshake_seconds_sum", frozenset({("outcome", "established")}))] == \
        pytest.approx((10 + 50 + 51 + 3000 + 6_000_000) / 1e6)
    assert [bucket("failed", le) for le in ("0.0001", "0.00025", "+Inf")] == [0, 1, 1]


def test_program_metrics_follow_the_kernels_counting(bpf_stats_on):
    app = make_app(WithPrograms(synthetic_monitor()))
    s = samples(scrape_app(app))
    assert s[("netmon_bpf_stats_enabled", frozenset())] == 1
    assert s[("netmon_ebpf_program_run_time_seconds_total",
              frozenset({("program", "netmon_connect_exit")}))] == pytest.approx(7.5e-6)
    assert s[("netmon_ebpf_program_run_count_total",
              frozenset({("program", "netmon_connect_enter")}))] == 10
    assert s[("netmon_ebpf_program_info",
              frozenset({("program", "netmon_connect_enter"), ("id", "31")}))] == 1
    bpf_stats_on.write_text("0\n")  # the kernel stopped counting: no frozen numbers
    s = samples(scrape_app(app))
    assert s[("netmon_bpf_stats_enabled", frozenset())] == 0
    assert not any(n.startswith("netmon_ebpf_program_run") for n, _ in s)
    assert ("netmon_ebpf_program_info",
            frozenset({("program", "netmon_connect_exit"), ("id", "32")})) in s


def test_process_and_platform_metrics():
    s = samples(scrape_app(make_app(synthetic_monitor())))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert s[("process_resident_memory_bytes", frozenset())] == pytest.approx(rss, rel=0.5)
    assert s[("process_cpu_seconds_total", frozenset())] > 0
    assert s[("process_open_fds", frozenset())] > 0
    assert any(n == "python_info" for n, _ in s)


def test_host_rejections_are_exported():
    mon = synthetic_monitor()
    guard = Guard(None, check_host=True)
    guard.app = make_app(mon, server_stats=guard.stats)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/stats", "QUERY_STRING": "",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "HTTP_HOST": "evil.example",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
               "wsgi.input": __import__("io").BytesIO(), "wsgi.errors": __import__("io").StringIO()}
    status = []
    b"".join(guard(environ, lambda st, h, e=None: status.append(st)))
    assert status[0].startswith("403")
    s = samples(scrape_app(guard.app))
    assert s[("netmon_http_host_rejected_total", frozenset())] == 1
    assert s[("netmon_http_auth_failures_total", frozenset())] == 0


def promtool_check(text):
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True)
    return r.returncode, (r.stdout + r.stderr).strip()


def test_promtool_accepts_the_metrics(bpf_stats_on):
    mon = synthetic_monitor()
    mon.inject(record(ret=-111))
    mon.inject(outcome(70))
    text = scrape_app(make_app(WithPrograms(mon), server_stats=lambda: {
        "auth_failures": 0, "host_rejected": 0}))
    assert promtool_check(text) == (0, "")
    assert promtool_check(text + "# TYPE bad_counter counter\nbad_counter 1\n")[0] != 0


def test_failing_destinations_are_the_worst_ten_of_the_window():
    mon = synthetic_monitor()
    for i in range(12):  # 12 failing destinations, i + 1 failures each
        for _ in range(i + 1):
            mon.inject(record(ip=f"10.0.0.{i}", port=443, ret=-111,
                              outcome=NETMON_OUTCOME_FAILED))
    mon.inject(record(ip="10.9.9.9", port=443, ret=-111, outcome=NETMON_OUTCOME_FAILED,
                      age=400))  # outside the 5 minutes
    for _ in range(50):
        mon.inject(record(ip="10.1.1.1", port=80))  # busy, never failing
    s = samples(scrape_app(make_app(mon)))
    got = {dict(k)["destination"]: v for (n, k), v in s.items()
           if n == "netmon_failing_destination_connects"}
    assert got == {f"10.0.0.{i}:443": i + 1 for i in range(2, 12)}


# ---- a real Prometheus scraping a real netmon (root) ----

def prom_query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return {tuple(sorted(s["metric"].items())): float(s["value"][1])
            for s in body["data"]["result"]}


def netmon_samples(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        return samples(r.read().decode())


@pytest.mark.bpf
def test_prometheus_scrapes_connects_and_the_handshake_histogram(tmp_path):
    proc, addr, _ = start("--backend", "syscall", "--capacity", "65536")
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: netmon, static_configs: [{{targets: ['{addr}']}}]}}\n")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{prom_port}"
    refused = ("netmon_connect_attempts_total", frozenset(
        {("family", "inet"), ("protocol", "tcp"), ("result", "ECONNREFUSED")}))
    established = ("netmon_tcp_handshake_seconds_count", frozenset({("outcome", "established")}))
    try:
        before = netmon_samples(addr)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            for _ in range(3):
                with socket.create_connection(listener.getsockname(), timeout=5):
                    pass
                with socket.socket() as s:
                    assert s.connect_ex(("127.0.0.1", free_port())) != 0
        deadline, after = time.monotonic() + 10, before
        while time.monotonic() < deadline and not (
                after.get(refused, 0) >= before.get(refused, 0) + 3 and
                after.get(established, 0) >= before.get(established, 0) + 3):
            time.sleep(0.05)
            after = netmon_samples(addr)
        assert after[refused] >= before.get(refused, 0) + 3
        assert after[established] >= before.get(established, 0) + 3
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            assert promtool_check(r.read().decode()) == (0, "")

        deadline = time.monotonic() + 30
        while True:  # Prometheus scrapes every second; its answers catch up
            try:
                got_refused = prom_query(base, 'netmon_connect_attempts_total{family="inet",'
                                               'protocol="tcp",result="ECONNREFUSED"}')
                got_hist = prom_query(base, 'netmon_tcp_handshake_seconds_count'
                                            '{outcome="established"}')
            except OSError:
                got_refused = got_hist = {}
            if got_refused and got_hist and \
                    list(got_refused.values())[0] >= after[refused] and \
                    list(got_hist.values())[0] >= after[established]:
                break
            assert time.monotonic() < deadline, (got_refused, got_hist, prom.poll())
            time.sleep(0.25)
        (labels, _), = got_refused.items()
        assert dict(labels)["job"] == "netmon" and dict(labels)["instance"] == addr
        buckets = prom_query(base, 'netmon_tcp_handshake_seconds_bucket{outcome="established"}')
        les = {dict(k)["le"] for k in buckets}
        assert "+Inf" in les and len(les) == 17
        median = prom_query(base, 'histogram_quantile(0.5, netmon_tcp_handshake_seconds_bucket'
                                  '{outcome="established"})')
        assert 0 < list(median.values())[0] <= 5  # a loopback handshake: well under 5 s
        assert http(f"http://{addr}/health")[0] == 200
    finally:
        prom.terminate()
        prom.wait(timeout=10)
        proc.terminate()
        proc.wait(timeout=10)


# ---- --log-format json ----

def test_json_log_lines():
    import logging

    from netmon import logfmt
    rec = logging.LogRecord("netmon.api", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    rec.created = 1_800_000_000.25
    assert json.loads(logfmt.JSONFormatter().format(rec)) == {
        "time": "2027-01-15T08:00:00.250000Z", "level": "warning", "logger": "netmon.api",
        "msg": "a b"}
    assert logfmt.line("text", "x") == "x"


@pytest.mark.bpf
def test_log_format_json_every_line_is_an_object():
    proc, addr, first = start("--log-format", "json", "--capacity", "4096")
    try:
        assert json.loads(first)["msg"].startswith("netmon ")
        assert http(f"http://{addr}/api/stats")[0] == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    lines = [first] + proc.stdout.read().splitlines() + proc.stderr.read().splitlines()
    objs = [json.loads(line) for line in lines]
    assert all(set(o) == {"time", "level", "logger", "msg"} for o in objs)
    assert {"level": "info", "logger": "netmon", "msg": "SIGTERM received, shutting down"} \
        in [{k: o[k] for k in ("level", "logger", "msg")} for o in objs]


def test_log_format_json_fatal_error_is_an_object():
    r = subprocess.run(netmon_command() + ["--log-format", "json", "--tls-cert", "x"],
                       capture_output=True, text=True, env=child_env())
    assert (r.returncode, r.stdout) == (2, "")
    (line,) = r.stderr.splitlines()
    obj = json.loads(line)
    assert (obj["level"], obj["msg"]) == (
        "error", "netmon: error: --tls-cert and --tls-key go together (see netmon --help)")


# ---- the Grafana dashboard ----

DASHBOARD = os.path.join(os.path.dirname(netmon.__file__), "data", "grafana-dashboard.json")


def dashboard_exprs():
    dash = json.load(open(DASHBOARD))
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_dashboard_uses_only_metrics_netmon_exports(bpf_stats_on):
    mon = synthetic_monitor()
    mon.inject(record(ret=-111, outcome=NETMON_OUTCOME_FAILED))  # a failing destination
    mon.inject(outcome(70))
    text = scrape_app(make_app(WithPrograms(mon), server_stats=lambda: {
        "auth_failures": 0, "host_rejected": 0}))
    exported = {name for name, _ in samples(text)}
    exprs = dashboard_exprs()
    titles = {t for t, _ in exprs}
    for wanted in ("Connects/s by result", "Top failing destinations (last 5 min)",
                   "Events lost: kernel drops and store evictions /s", "Poll lag",
                   "netmon CPU", "netmon RSS"):
        assert wanted in titles
    for title, expr in exprs:
        used = set(re.findall(r"\b((?:netmon|process|python)_[a-zA-Z0-9_]+)", expr))
        assert used, (title, expr)
        assert used <= exported, (title, used - exported)


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses PromQL in rule files: each query as a recording rule
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": expr.replace("$__rate_interval", "5m")
         .replace("$job", ".*").replace("$instance", ".*")}
        for i, (_, expr) in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
