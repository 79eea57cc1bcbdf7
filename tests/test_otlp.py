"""The OTLP/HTTP event exporter (the otlp extra), against a receiver in the test that
decodes opentelemetry-proto's ExportLogsServiceRequest: settings in the OpenTelemetry
conventions, every field of real captured events, retries with back-off, a bounded queue
whose drops are counted, and capture going on while the collector is down."""
import datetime as dt
import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import free_port, http, run_child, samples, start
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from netmon import otlp
from netmon.testing import record, synthetic_monitor


class Receiver:
    """An OTLP/HTTP logs endpoint on loopback: answers `statuses` in turn (then 200) and
    keeps every request it accepted, decoded."""

    def __init__(self, statuses=()):
        self.requests, self.headers, self.statuses = [], [], list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 200:
                    req = ExportLogsServiceRequest()
                    req.ParseFromString(body)
                    receiver.requests.append(req)
                    receiver.headers.append(dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def records(self):
        """[(resource attributes, record)] of every log record received."""
        return [({a.key: a.value.string_value for a in rl.resource.attributes}, rec)
                for req in self.requests for rl in req.resource_logs
                for sl in rl.scope_logs for rec in sl.log_records]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def attrs(rec):
    out = {}
    for a in rec.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key[len("netmon."):]] = getattr(a.value, kind)
    return out


def wait_until(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_config_follows_the_opentelemetry_conventions():
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc,x-tenant = t1",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
           "OTEL_SERVICE_NAME": "netmon-edge", "OTEL_RESOURCE_ATTRIBUTES": "k8s.node.name=n1"}
    cfg = otlp.config("http://collector:4318/", env)
    assert cfg.url == "http://collector:4318/v1/logs"
    assert cfg.headers == {"authorization": "Bearer abc", "x-tenant": "t1"}
    assert (cfg.timeout, cfg.gzip) == (2.5, True)
    assert cfg.resource["service.name"] == "netmon-edge"
    assert cfg.resource["k8s.node.name"] == "n1" and cfg.resource["host.name"]
    logs = otlp.config("http://ignored:4318", {
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "https://c:4318/custom/logs",
        "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "100", "OTEL_EXPORTER_OTLP_TIMEOUT": "9000"})
    assert (logs.url, logs.timeout, logs.gzip) == ("https://c:4318/custom/logs", 0.1, False)
    assert otlp.config(None, {}).url == "http://localhost:4318/v1/logs"
    for bad in ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "x"},
                {"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
                {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}):
        with pytest.raises(otlp.ConfigError):
            otlp.config("http://c:4318", bad)
    with pytest.raises(otlp.ConfigError):
        otlp.config("ftp://c", {})


def test_synthetic_events_exported_with_retries(receiver):
    receiver.statuses = [503, 503]  # the collector is busy twice: retried, not lost
    mon = synthetic_monitor()
    exp = otlp.Exporter(mon, otlp.config(receiver.url, {"OTEL_EXPORTER_OTLP_COMPRESSION":
                                                        "gzip"}))
    exp.start()
    try:
        for i in range(5):
            mon.inject(record(pid=100 + i, comm="syn", ret=-111, port=1000 + i))
        # the receiver holds the records before the exporter has read its answer
        wait_until(lambda: len(receiver.records()) == 5 and exp.stats()["sent"] == 5)
        assert exp.stats()["retries"] == 2
        _, rec = receiver.records()[0]
        assert attrs(rec)["pid"] == 100 and attrs(rec)["error"] == "ECONNREFUSED"
        assert rec.severity_text == "WARN" and rec.event_name == "netmon.connect"
        assert receiver.headers[0]["Content-Type"] == "application/x-protobuf"
    finally:
        exp.stop()


def test_receiver_down_queue_is_bounded_and_drops_counted(monkeypatch):
    monkeypatch.setattr(otlp, "BATCH_EVENTS", 10)
    monkeypatch.setattr(otlp, "QUEUE_BATCHES", 3)
    mon = synthetic_monitor()
    exp = otlp.Exporter(mon, otlp.config(f"http://127.0.0.1:{free_port()}", {}))  # nobody
    exp.start()
    try:
        for i in range(55):
            mon.inject(record(pid=i, age=2))  # settled already
        # read in batches of 10: 10, 10, 10, 10, 10, 5; the queue keeps the newest 3
        wait_until(lambda: exp.stats()["dropped"]["queue_full"] == 30)
        wait_until(lambda: exp.stats()["retries"] >= 1)
        st = exp.stats()
        assert (st["sent"], st["queued"]) == (0, 25)
        assert mon.count(kind=None) == 55  # the store took everything meanwhile
    finally:
        exp.stop(flush_seconds=0)
    assert exp.stats()["dropped"]["queue_full"] == 55  # never sent, all counted


def test_events_the_store_overwrote_are_counted(receiver, monkeypatch):
    monkeypatch.setattr(otlp, "TICK_SECONDS", 5.0)  # the exporter reads rarely
    mon = synthetic_monitor(capacity=8)
    exp = otlp.Exporter(mon, otlp.config(receiver.url, {}))
    exp.start()
    try:
        for i in range(20):
            mon.inject(record(pid=i, age=2))
        exp._stop.set()  # wake it: it reads once more, then flushes
        exp._thread.join(timeout=10)
    finally:
        exp.stop()
    st = exp.stats()
    assert st["dropped"]["evicted"] + st["sent"] == 20 and st["dropped"]["evicted"] >= 12


# ---- the netmon command, real connects (root) ----

@pytest.mark.bpf
def test_real_events_arrive_with_every_field(receiver, cgroup):
    # scoped to a cgroup of the test's own: the exporter sends every event it sees, and
    # a flood of connects elsewhere on the host (other test runs) is not this test's
    proc, addr, _ = start("--backend", "syscall", "--capacity", "1048576",
                          "--cgroup", str(cgroup), "--otlp-endpoint", receiver.url,
                          env={"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"})
    try:
        dead = free_port()
        child = run_child("nm-otlp", [{"family": "inet", "addr": ["127.0.0.1", dead],
                                       "repeat": 2}], preexec_fn=cgroup.enter)
        pid = child["pid"]
        wait_until(lambda: len([r for _, r in receiver.records()
                                if attrs(r).get("pid") == pid]) == 2)
        events = http(f"http://{addr}/api/events?pid={pid}")[2]["events"]
        got = [(res, r) for res, r in receiver.records() if attrs(r).get("pid") == pid]
        assert len(events) == 2
        for ev, (res, rec) in zip(events, got):
            want = {k: v for k, v in ev.items()
                    if v is not None and k not in ("timestamp", "wall_time")}
            assert attrs(rec) == want  # every field the API has, typed
            assert (ev["command"], ev["error"], ev["destination"]) == (
                "nm-otlp", "ECONNREFUSED", f"127.0.0.1:{dead}")
            # the API converts the boot clock with the wall-clock offset of the moment it
            # answers (refreshed to follow NTP), the exporter with that of its own read:
            # the same instant, to within the offset's drift between the two
            ts = rec.time_unix_nano
            api = dt.datetime.strptime(ev["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=dt.timezone.utc)
            assert abs(ts - int(api.timestamp() * 1e6) * 1000) < 1_000_000
            assert rec.observed_time_unix_nano >= ts
            assert (rec.severity_number, rec.severity_text) == (13, "WARN")
            assert rec.event_name == "netmon.connect"
            assert rec.body.string_value == f"connect 127.0.0.1:{dead} by nm-otlp[{pid}]: " \
                                            "ECONNREFUSED"
            assert res["service.name"] == "netmon" and res["deployment.environment"] == "test"
        stats = http(f"http://{addr}/api/stats")[2]["otlp"]
        assert stats["sent"] >= 2 and stats["endpoint"] == receiver.url + "/v1/logs"
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


@pytest.mark.bpf
def test_collector_down_capture_goes_on_and_unsent_is_counted():
    proc, addr, _ = start("--backend", "syscall", "--capacity", "1048576",
                          "--otlp-endpoint", f"http://127.0.0.1:{free_port()}")
    try:
        child = run_child("nm-otlp-down", [{"family": "inet",
                                            "addr": ["127.0.0.1", free_port()],
                                            "repeat": 3}])
        wait_until(lambda: http(f"http://{addr}/api/events?pid={child['pid']}")[2]["count"]
                   == 3)  # captured and queryable while nothing can be sent
        assert http(f"http://{addr}/health")[0] == 200

        def unsent():
            import urllib.request
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
                s = samples(r.read().decode())
            dropped = sum(v for (n, _), v in s.items() if n == "netmon_otlp_events_dropped_total")
            return s, s[("netmon_otlp_queue_events", frozenset())] + dropped
        wait_until(lambda: unsent()[1] >= 3)  # settled, batched, not sent
        wait_until(lambda: unsent()[0][("netmon_otlp_retries_total", frozenset())] >= 1)
        s, _ = unsent()
        assert s[("netmon_otlp_events_sent_total", frozenset())] == 0
        assert s[("netmon_otlp_retries_total", frozenset())] >= 1
        assert http(f"http://{addr}/api/stats")[2]["otlp"]["sent"] == 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
