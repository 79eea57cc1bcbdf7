"""Events off the host: an exporter that sends every captured event as an OpenTelemetry log
record over OTLP/HTTP (protobuf) to a collector. Optional: it needs the `otlp` extra
(`pip install 'netmon-ebpf[otlp]'`, which brings opentelemetry-proto).

It never touches the capture path: its own thread follows the store by sequence number
(the store is the buffer; what the store overwrote before it was read is counted),
batches events into a bounded queue (full: the oldest batch is dropped and counted),
and sends the head batch, retrying with exponential back-off while the collector is down
or busy. Configuration follows the OpenTelemetry exporter conventions
(OTEL_EXPORTER_OTLP_[LOGS_]ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES)."""
from __future__ import annotations

import collections
import datetime as _dt
import gzip
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Deque, Dict, List, Mapping, NamedTuple, Optional, Tuple

from ._version import __version__
from .event import Event

log = logging.getLogger("netmon.otlp")

DEFAULT_ENDPOINT = "http://localhost:4318"
BATCH_EVENTS = 512        # events per request at most
QUEUE_BATCHES = 64        # batches waiting to be sent at most
SETTLE_SECONDS = 1.0      # an event is sent once this old: its TCP outcome is in by then
TICK_SECONDS = 0.5
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
RETRYABLE = {429, 502, 503, 504}  # the OTLP/HTTP spec's retryable statuses
SEVERITY_INFO, SEVERITY_WARN = 9, 13
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class ConfigError(ValueError):
    """A bad OTEL_* setting, or the otlp extra missing."""


class Config(NamedTuple):
    url: str
    headers: Dict[str, str]
    timeout: float
    gzip: bool
    resource: Dict[str, str]


def _pairs(text: str, what: str) -> Dict[str, str]:
    """'k1=v1,k2=v2' (values URL-encoded), as OTEL_EXPORTER_OTLP_HEADERS and
    OTEL_RESOURCE_ATTRIBUTES have them."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: {item!r} is not key=value")
        out[urllib.parse.unquote(key.strip())] = urllib.parse.unquote(value.strip())
    return out


def config(endpoint: Optional[str], env: Mapping[str, str]) -> Config:
    """The exporter's settings from --otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT: a base
    URL, /v1/logs appended) and the OTEL_* environment (a _LOGS_ variable wins over the
    general one; OTEL_EXPORTER_OTLP_LOGS_ENDPOINT is used as it is)."""
    def get(name: str) -> Optional[str]:
        return env.get(f"OTEL_EXPORTER_OTLP_LOGS_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")

    protocol = get("PROTOCOL") or "http/protobuf"
    if protocol != "http/protobuf":
        raise ConfigError(f"OTLP protocol {protocol!r} is not supported: netmon sends "
                          "http/protobuf")
    url = env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT") or \
        (endpoint or DEFAULT_ENDPOINT).rstrip("/") + "/v1/logs"
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"OTLP endpoint {url!r} is not an http(s) URL")
    try:
        timeout = float(get("TIMEOUT") or 10000) / 1000
    except ValueError:
        raise ConfigError("OTEL_EXPORTER_OTLP_TIMEOUT must be milliseconds") from None
    compression = (get("COMPRESSION") or "none").lower()
    if compression not in ("none", "gzip"):
        raise ConfigError(f"OTLP compression {compression!r}: use gzip or none")
    resource = _pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", ""), "OTEL_RESOURCE_ATTRIBUTES")
    resource.setdefault("host.name", socket.gethostname())
    resource["service.name"] = env.get("OTEL_SERVICE_NAME") or resource.get("service.name",
                                                                            "netmon")
    resource["service.version"] = __version__
    return Config(url, _pairs(get("HEADERS") or "", "OTEL_EXPORTER_OTLP_HEADERS"),
                  timeout, compression == "gzip", resource)


def _proto():
    try:
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.logs.v1 import logs_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2
    except ImportError:
        raise ConfigError("OTLP export needs the otlp extra: pip install "
                          "'netmon-ebpf[otlp]'") from None
    return logs_service_pb2, common_pb2, logs_pb2, resource_pb2


def _value(common_pb2, v):
    if isinstance(v, bool):
        return common_pb2.AnyValue(bool_value=v)
    if isinstance(v, int):
        return common_pb2.AnyValue(int_value=v)
    return common_pb2.AnyValue(string_value=str(v))


def _body(ev: Event) -> str:
    result = ev.error or ("ok" if ev.return_code == 0 else "unknown")
    return f"{ev.kind} {ev.destination} by {ev.command}[{ev.pid}]: {result}"


class Exporter:
    """Follows `monitor`'s store from the moment start() is called and sends each event
    once, batched. stats(): sent, dropped by reason, retries, queued."""

    def __init__(self, monitor, cfg: Config):
        self._monitor, self._cfg = monitor, cfg
        self._pb = _proto()
        self._queue: Deque[Tuple[bytes, int]] = collections.deque()
        self._lock = threading.Lock()
        self._counts = {"sent": 0, "retries": 0, "queue_full": 0, "evicted": 0,
                        "rejected": 0}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._cursor = 0

    def start(self) -> None:
        self._cursor = self._monitor.seq_range()[1]  # from now on
        self._thread = threading.Thread(target=self._run, name="netmon-otlp", daemon=True)
        self._thread.start()

    def stop(self, flush_seconds: float = 2.0) -> None:
        """Stop reading; try the queue for up to flush_seconds more, then give up on it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=flush_seconds + self._cfg.timeout)

    def stats(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
            queued = sum(n for _, n in self._queue)
        return {"sent": counts.pop("sent"), "retries": counts.pop("retries"),
                "dropped": counts, "queued": queued, "endpoint": self._cfg.url}

    def _count(self, what: str, n: int) -> None:
        with self._lock:
            self._counts[what] += n

    # ---- the thread ----

    def _run(self) -> None:
        backoff, next_try = BACKOFF_FIRST, 0.0
        while not self._stop.is_set():
            self._read()
            if self._queue and time.monotonic() >= next_try:
                ok, retry = self._send_head()
                if ok or not retry:
                    backoff, next_try = BACKOFF_FIRST, 0.0
                    continue  # more may be queued: no sleep
                self._count("retries", 1)
                next_try = time.monotonic() + backoff * random.uniform(0.5, 1.0)
                backoff = min(backoff * 2, BACKOFF_MAX)
            self._stop.wait(TICK_SECONDS)
        self._read()  # stopping: what has settled by now, then a last try at the queue
        deadline = time.monotonic() + 2.0
        while self._queue and time.monotonic() < deadline and self._send_head()[0]:
            pass
        with self._lock:
            self._counts["queue_full"] += sum(n for _, n in self._queue)  # never sent
            self._queue.clear()

    def _read(self) -> None:
        """Move settled events from the store into the queue, a batch at a time."""
        settled = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=SETTLE_SECONDS)
        while True:
            oldest = self._monitor.seq_range()[0]
            if oldest > self._cursor + 1:  # overwritten before it could be read
                self._count("evicted", oldest - self._cursor - 1)
                self._cursor = oldest - 1
            events, _ = self._monitor.query(limit=BATCH_EVENTS, newest=False,
                                            after_seq=self._cursor, kind=None)
            ready: List[Event] = []
            for ev in events:
                if ev.timestamp > settled:
                    break
                ready.append(ev)
            if not ready:
                return
            self._cursor = ready[-1].seq
            self._enqueue(self._encode(ready), len(ready))
            if len(ready) < BATCH_EVENTS:
                return

    def _enqueue(self, body: bytes, n: int) -> None:
        with self._lock:
            if len(self._queue) >= QUEUE_BATCHES:
                self._counts["queue_full"] += self._queue.popleft()[1]
            self._queue.append((body, n))

    def _encode(self, events: List[Event]) -> bytes:
        service, common, logs, resource = self._pb
        now = time.time_ns()
        records = []
        for ev in events:
            attrs = [common.KeyValue(key=f"netmon.{k}", value=_value(common, v))
                     for k, v in ev.to_dict().items()
                     if v is not None and k not in ("timestamp", "wall_time")]
            failed = ev.return_code not in (0, None) and ev.error != "EINPROGRESS" or \
                ev.outcome in ("refused", "timeout", "reset", "unreachable")
            records.append(logs.LogRecord(
                time_unix_nano=(ev.timestamp - _EPOCH) // _dt.timedelta(microseconds=1) * 1000,
                observed_time_unix_nano=now, event_name=f"netmon.{ev.kind}",
                severity_number=SEVERITY_WARN if failed else SEVERITY_INFO,
                severity_text="WARN" if failed else "INFO",
                body=common.AnyValue(string_value=_body(ev)), attributes=attrs))
        request = service.ExportLogsServiceRequest(resource_logs=[logs.ResourceLogs(
            resource=resource.Resource(attributes=[
                common.KeyValue(key=k, value=common.AnyValue(string_value=v))
                for k, v in sorted(self._cfg.resource.items())]),
            scope_logs=[logs.ScopeLogs(scope=common.InstrumentationScope(
                name="netmon", version=__version__), log_records=records)])])
        return request.SerializeToString()

    def _send_head(self) -> Tuple[bool, bool]:
        """POST the oldest queued batch: (sent, worth retrying). A batch the collector
        rejects for good (4xx but 429) is dropped and counted."""
        with self._lock:
            if not self._queue:
                return True, False
            body, n = self._queue[0]
        headers = {**self._cfg.headers, "Content-Type": "application/x-protobuf",
                   "User-Agent": f"netmon/{__version__}"}
        if self._cfg.gzip:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        req = urllib.request.Request(self._cfg.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self._cfg.timeout) as r:
                r.read()
            status = 200
        except urllib.error.HTTPError as e:
            status = e.code
        except (OSError, ValueError) as e:  # refused, reset, timed out, bad TLS
            log.debug("OTLP export to %s failed: %s", self._cfg.url, e)
            return False, True
        if 200 <= status < 300 or status not in RETRYABLE:
            with self._lock:  # only this thread changes the queue: the head is still it
                self._queue.popleft()
                self._counts["sent" if status < 300 else "rejected"] += n
            if status >= 300:
                log.warning("the OTLP collector at %s rejected %d events (HTTP %d)",
                            self._cfg.url, n, status)
            return status < 300, False
        return False, True
