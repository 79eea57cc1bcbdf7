"""The HTTP server: a cheroot WSGI server that netmon owns, binds first and stops cleanly.

Bounded: a fixed worker pool and accept queue, requests read whole before a worker takes
them and within a deadline, connections capped per client and in all, limits on header
and body size (intake.py). cheroot answers some errors itself, before the app runs
(oversize headers, malformed requests, a full queue); those answers are JSON too.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import threading
import time
from typing import Optional, Tuple

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from . import intake
from .limits import MAX_BODY_BYTES, MAX_STREAMS

log = logging.getLogger("netmon.server")

THREADS = 8  # for requests; each open event stream holds a thread of its own on top
ACCEPT_QUEUE = 64  # connections waiting for a worker; past this cheroot answers 503
LISTEN_BACKLOG = 128
SOCKET_TIMEOUT = 10  # seconds a client may stall mid-request
SHUTDOWN_TIMEOUT = 3  # seconds in-flight requests get to finish on shutdown
STREAM_GRACE = 0.2  # seconds event streams get to end by themselves on shutdown
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# what a service manager or an operator may send; netmon acts on them, they never kill it
SERVICE_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class ServerError(RuntimeError):
    """The server cannot listen; the message names the cause and the fix."""


class _WSGIServer(wsgi.Server):
    ConnectionClass = intake.Connection
    max_request_header_size = intake.MAX_HEADER_BYTES
    max_request_body_size = MAX_BODY_BYTES  # a backstop: the app answers 413 itself
    # the connection loop's select timeout: how often it expires slow connections and how
    # long stop() waits for it (cheroot: 0.5 s)
    expiration_interval = 0.1
    bind_error: Optional[OSError] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        intake.map_large_blocks()
        self.streams: set = set()  # connections answering with an event stream
        self.answering: dict = {}  # connection -> monotonic time its worker took it
        self.answering_lock = threading.Lock()
        self.answers_cut = 0  # answers not taken within intake.ANSWER_TIMEOUT
        self._admission = intake.Admission()
        self.admit = self._admission.admit
        self.connections_closed = self._admission.connections_closed
        self.connections_refused = lambda: self._admission.refused

    def bind(self, family, type, proto=0):
        try:
            return super().bind(family, type, proto)
        except OSError as e:  # cheroot folds it into a message; keep the errno
            self.bind_error = e
            raise

    def prepare(self):
        """Bind and listen, but leave the worker threads to serve(): netmon drops its
        capabilities between the two, and capabilities are per thread."""
        start, self.requests.start = self.requests.start, lambda: None
        try:
            super().prepare()
        finally:
            self.requests.start = start
        self._connections.__class__ = intake.Connections
        self.requests._force_close = intake.force_close

    def serve(self):
        self.requests.start()
        super().serve()

    def process_conn(self, conn):
        """conn is readable (the loop calls this): read on, hand it on once complete."""
        self._connections.examine(conn)

    def dispatch(self, conn):
        """A whole request is buffered: to a worker (or a 503 when the queue is full)."""
        super().process_conn(conn)

    def end_streams(self, grace: float) -> None:
        """Event streams end once `shutdown` is set, unless their worker is blocked
        writing to a client that stopped reading: after `grace` seconds, cut those."""
        deadline = time.monotonic() + grace
        while self.streams and time.monotonic() < deadline:
            time.sleep(0.01)
        for conn in list(self.streams):
            intake.force_close(conn)

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        log.log(level, "%s", msg, exc_info=traceback)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_error(host: str, port: int, e: Optional[OSError]) -> ServerError:
    where = host_port(host, port)
    if e is not None and e.errno == errno.EADDRINUSE:
        return ServerError(f"cannot listen on {where}: the port is already in use; stop the "
                           f"other process (ss -ltnp 'sport = :{port}') or pick another port "
                           "with --addr")
    if e is not None and e.errno == errno.EACCES:
        return ServerError(f"cannot listen on {where}: permission denied (ports below 1024 "
                           "need root or CAP_NET_BIND_SERVICE); pick another port with --addr")
    if e is not None and e.errno == errno.EADDRNOTAVAIL:
        return ServerError(f"cannot listen on {where}: no local interface has that address; "
                           "use 127.0.0.1, [::1] or :PORT with --addr")
    reason = e.strerror if e is not None and e.strerror else str(e)
    return ServerError(f"cannot listen on {where}: {reason}; check the host in --addr")


class Server:
    """Serve a WSGI app on host:port from a background thread.

    bind() first (it fails fast on a busy port), then start(); stop() sets `shutdown` (the
    event make_app() was given: open event streams end), stops accepting, lets in-flight
    requests finish (up to SHUTDOWN_TIMEOUT) and joins the thread. The pool has `threads`
    workers plus one per possible event stream, so streams never starve requests.
    """

    def __init__(self, app, host: str, port: int, *, threads: int = THREADS,
                 tls: Optional[Tuple[str, str]] = None,
                 shutdown: Optional[threading.Event] = None):
        self.shutdown = shutdown if shutdown is not None else threading.Event()
        threads += MAX_STREAMS
        self._httpd = _WSGIServer((host, port), app, numthreads=threads, max=threads,
                                  request_queue_size=LISTEN_BACKLOG, timeout=SOCKET_TIMEOUT,
                                  shutdown_timeout=SHUTDOWN_TIMEOUT,
                                  accepted_queue_size=ACCEPT_QUEUE, server_name="netmon")
        if tls is not None:  # (certificate file, key file): cheroot's builtin ssl adapter
            try:
                self._httpd.ssl_adapter = BuiltinSSLAdapter(*tls)
            except (OSError, ValueError) as e:
                raise ServerError(f"cannot use the TLS certificate {tls[0]} and key {tls[1]}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        self._thread: Optional[threading.Thread] = None

    def bind(self) -> None:
        host, port = self._httpd.bind_addr
        try:
            self._httpd.prepare()
        except OSError:
            raise _bind_error(host, port, self._httpd.bind_error) from None

    def stats(self) -> dict:
        """The HTTP layer's own counters: connections refused at the caps (503), answers
        cut because the client did not take them within intake.ANSWER_TIMEOUT."""
        return {"connections_refused": self._httpd.connections_refused(),
                "answers_cut": self._httpd.answers_cut}

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) actually bound: the real port when 0 was asked for."""
        return self._httpd.bind_addr

    @property
    def url(self) -> str:
        scheme = "https" if self._httpd.ssl_adapter is not None else "http"
        return f"{scheme}://" + host_port(*self.address)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve, name="netmon-http")
        self._thread.start()

    def stop(self) -> None:
        self.shutdown.set()
        if self._thread is not None:
            self._httpd.end_streams(STREAM_GRACE)
        self._httpd.stop()
        if self._thread is not None:
            self._thread.join()


class ShutdownSignals:
    """Catch SIGTERM and SIGINT (and the signals in `also`) from entry on; wait() blocks
    until one arrives.

    The handlers do nothing in Python (no locks in a signal handler); the interpreter's
    wakeup fd carries the signal number to wait(). Previous handlers come back on exit.
    """

    def __init__(self, also: Tuple[signal.Signals, ...] = ()):
        self._signals = SHUTDOWN_SIGNALS + tuple(also)

    def __enter__(self) -> "ShutdownSignals":
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old = {s: signal.signal(s, lambda *_: None) for s in self._signals}
        self._old_fd = signal.set_wakeup_fd(self._w)
        return self

    def wait(self, timeout: Optional[float] = None) -> Optional[signal.Signals]:
        """The signal that arrived, or None after `timeout` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._r], [], [], left)[0]:
                return None
            signum = os.read(self._r, 1)[0]
            if signum in self._signals:
                return signal.Signals(signum)

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for s, handler in self._old.items():
            signal.signal(s, handler)
        os.close(self._r)
        os.close(self._w)
