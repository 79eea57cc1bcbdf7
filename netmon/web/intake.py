"""How a request reaches a worker: whole, within a deadline, and parsed strictly.

cheroot hands a connection to a worker thread as soon as it is readable, and the worker
then blocks reading the rest: a client sending a byte a second holds a worker, and a few
dozen such clients starve everyone. Here the connection loop (one thread, select) reads
each request head, and the body its Content-Length announces, without blocking; a worker
gets the connection only once the whole request is buffered, so workers never wait on a
client. A request not complete HEAD_TIMEOUT seconds after its first byte (after the
accept, for a new connection) is answered 408 and closed. Connections are capped per
client address and in total; TLS handshakes run in the loop too, without blocking it.

The head is then parsed strictly (RFC 9112): framing two parsers could read differently
(any Transfer-Encoding, a repeated or non-numeric Content-Length, a header name not
directly followed by its colon, a folded line) and the Host rules (one Host, required in
HTTP/1.1, a plain name or address) are refused with 400 (411 for a Transfer-Encoding
alone), and every answer the server gives itself closes the connection without reading
any further.

Answers go out within a deadline too: a client that reads its answer a little at a time
(each send waits up to the socket timeout, and a trickle resets it) would hold the worker
for as long as it likes. An answer not written ANSWER_TIMEOUT seconds after its worker
began has its connection cut (counted: answers_cut); event streams, which are meant to
last, are bounded by their own cap instead.
"""
from __future__ import annotations

import collections
import ctypes
import re
import socket
import ssl
import struct
import threading
import time
from typing import Optional

from cheroot import connections as cheroot_connections
from cheroot import errors as cheroot_errors
from cheroot import server as cheroot_server
from cheroot.makefile import MakeFile

from .limits import MAX_BODY_BYTES, error_body, reason

HEAD_TIMEOUT = 5.0  # seconds from a request's first byte (or the accept) to its last
ANSWER_TIMEOUT = 10.0  # seconds from a worker taking a request to its answer's last byte
MAX_CONNECTIONS = 512  # open connections in all; past it new ones get a 503 and are closed
MAX_PER_CLIENT = 256  # open connections from one client address
MAX_HEADER_BYTES = 16 * 1024
READ_CHUNK = 64 * 1024
# past this, a head without its blank line goes to the parser, which answers 413/414
_OVERSIZE = MAX_HEADER_BYTES + 1024

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field name
_BAD_VALUE = re.compile(rb"[\r\n\0]")
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?")
_LENGTH = re.compile(rb"[0-9]{1,15}")
_LISTS = frozenset(cheroot_server.comma_separated_headers)  # may repeat: values join
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
TRIM_AFTER_BYTES = 1 << 20  # after an answer this large, give freed memory back
_libc = ctypes.CDLL(None)
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc's; musl has none
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_blocks() -> None:
    """Blocks of 256 KiB and more get their own mappings, returned to the kernel when
    freed. glibc's default threshold rises after each large free, so the next large
    answer's buffers would land in an arena that never shrinks."""
    if hasattr(_libc, "mallopt"):
        _libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)


def release_memory() -> None:
    """A large answer's objects were freed in the worker thread's own malloc arena, which
    glibc does not shrink by itself: RSS would stay at its peak. Give it back."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class Refused(ValueError):
    """A request head netmon will not read further; the answer's status and message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _framing(headers: dict) -> None:
    te, length = headers.get(b"Transfer-Encoding"), headers.get(b"Content-Length")
    if te is not None and length is not None:
        raise Refused("Transfer-Encoding and Content-Length together: ambiguous framing")
    if te is not None:
        raise Refused("send the body with a Content-Length header; Transfer-Encoding "
                      "(chunked) is not accepted", 411)
    if length is not None and not _LENGTH.fullmatch(length):
        raise Refused("Content-Length must be one decimal number")


def _host(headers: dict, http11: bool) -> None:
    host = headers.get(b"Host")
    if host is None:
        if http11:
            raise Refused("an HTTP/1.1 request needs a Host header")
    elif not _HOST.fullmatch(host):
        raise Refused("malformed Host header: expected a name or an address, and a port")


class StrictHeaders(cheroot_server.HeaderReader):
    """cheroot's header reader lets the last of two Content-Length or Host headers win,
    takes 'Name : value' and folded lines: refuse all of them (Refused). Header names with
    an underscore are dropped, as nginx does: WSGI would confuse them with dashed ones."""

    def __init__(self, http11: bool, continued: bool):
        self.http11 = http11
        self.continued = continued  # the loop already sent "100 Continue"
        self.refusal: Optional[Refused] = None

    def __call__(self, rfile, hdict=None):
        try:
            return self._read(rfile, {} if hdict is None else hdict)
        except Refused as e:
            self.refusal = e
            raise

    def _read(self, rfile, headers: dict) -> dict:
        while True:
            line = rfile.readline()
            if line == b"\r\n":
                break
            if not line.endswith(b"\r\n"):
                raise Refused("the request head ends early or a line lacks its CRLF")
            name, colon, value = line[:-2].partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise Refused("malformed header line: a name must be a token directly "
                              "followed by ':', and lines cannot be folded")
            value = value.strip(b" \t")
            if _BAD_VALUE.search(value):
                raise Refused("a header value holds CR, LF or NUL")
            key = name.title()
            if b"_" in name or (key == b"Expect" and self.continued):
                continue
            if key in headers:
                if key not in _LISTS:
                    raise Refused(f"more than one {key.decode()} header")
                value = headers[key] + b", " + value
            headers[key] = value
        _framing(headers)
        _host(headers, self.http11)
        return headers


class Request(cheroot_server.HTTPRequest):
    """Strict headers; every answer cheroot gives itself (malformed, too large, timed out)
    is JSON and closes the connection; event streams are known to the server, which ends
    them first when it stops."""

    def read_request_headers(self):
        self.header_reader = StrictHeaders(self.request_protocol == b"HTTP/1.1",
                                           self.conn.continued)
        return super().read_request_headers()

    def simple_response(self, status, msg=""):
        refusal = getattr(self.header_reader, "refusal", None)
        code = refusal.status if refusal is not None else int(str(status)[:3])
        self.close_connection = True  # whatever follows was not read: never parse it
        try:
            self.conn.wfile.write(response(code, msg or reason(code)))
        except OSError as e:
            if e.args[0] not in cheroot_errors.socket_errors_to_ignore:
                raise

    def send_headers(self):
        if any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
               for k, v in self.outheaders):
            self.server.streams.add(self.conn)
        super().send_headers()

    def respond(self):
        written = self.conn.wfile.bytes_written
        with self.server.answering_lock:  # see Connections._cut_slow_answers
            self.server.answering[self.conn] = time.monotonic()
        try:
            super().respond()
        finally:
            with self.server.answering_lock:
                self.server.answering.pop(self.conn, None)
            self.server.streams.discard(self.conn)
            if self.conn.wfile.bytes_written - written > TRIM_AFTER_BYTES:
                release_memory()


def response(code: int, message: str, extra: str = "") -> bytes:
    """A complete error answer that closes the connection, as bytes."""
    body = error_body(code, message).encode()
    return (f"HTTP/1.1 {code} {reason(code)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n").encode("latin-1") + body


def _wanted(head: bytes) -> int:
    """The body length a complete head announces, when the loop should wait for it: one
    Content-Length within the body limit. 0 otherwise (the parser refuses what is odd)."""
    lengths = [v.strip(b" \t") for name, _, v in (line.partition(b":")
               for line in head.split(b"\n")) if name.lower() == b"content-length"]
    if len(lengths) == 1 and _LENGTH.fullmatch(lengths[0]) \
            and int(lengths[0]) <= MAX_BODY_BYTES:
        return int(lengths[0])
    return 0


def _expects_continue(head: bytes) -> bool:
    return re.search(rb"(?im)^expect:[ \t]*100-continue[ \t]*\r?$", head) is not None


class Connection(cheroot_server.HTTPConnection):
    """A connection whose requests the loop reads into its buffer before a worker runs."""

    RequestHandlerClass = Request
    handshaking = False  # TLS, until the handshake completes in the loop
    head_since: Optional[float] = None  # monotonic; None while idle between requests
    continued = False  # "100 Continue" was sent for the request being read
    client: Optional[str] = None  # counted against the caps until closed
    _scanned = 0  # buffer bytes already searched for the end of the head

    def buffered(self) -> bytes:
        rf = self.rfile
        return rf._read_buf[rf._read_pos:]

    def _buffer(self, data: bytes) -> None:
        rf = self.rfile  # cheroot's reader is _pyio's BufferedReader: extend its buffer
        with rf._read_lock:
            rf._read_buf = rf._read_buf[rf._read_pos:] + data
            rf._read_pos = 0

    def next_request(self) -> None:
        """A response went out; what is buffered already is the next request's start."""
        self.continued = False
        self._scanned = 0
        self.head_since = time.monotonic() if self.rfile.has_data() else None

    def receive(self) -> Optional[bool]:
        """Read what the socket has without blocking: True once a whole request is
        buffered, False while more is to come, None when the connection is over."""
        sock = self.socket
        try:
            sock.settimeout(0)
            if self.handshaking and not self._handshake():
                return None if self.handshaking is None else False
            eof = self._read_available(sock)
            sock.settimeout(self.server.timeout)
        except OSError:
            return None
        return True if self._complete() else None if eof else False

    def _handshake(self) -> bool:
        try:
            self.socket.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (OSError, ValueError):
            self.handshaking = None  # failed: a plain-HTTP client, or gone
            return False
        self.handshaking = False
        self.ssl_env = self.server.ssl_adapter.get_environ(self.socket)
        return True

    def _read_available(self, sock) -> bool:
        """Append what the socket holds (up to one request's worth) to the buffer; True at
        end of stream."""
        while len(self.buffered()) < _OVERSIZE + MAX_BODY_BYTES:
            try:
                data = sock.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            if not data:
                return True
            if self.head_since is None:
                self.head_since = time.monotonic()
            self._buffer(data)
        return False

    def _complete(self) -> bool:
        buf = self.buffered()
        end = _HEAD_END.search(buf, max(0, self._scanned - 3))
        if end is None:
            self._scanned = len(buf)
            return len(buf) > _OVERSIZE
        head = buf[:end.end()]
        wanted = _wanted(head)
        complete = len(buf) >= end.end() + wanted
        if wanted and not self.continued and _expects_continue(head):
            self.continued = True  # the parser then leaves Expect alone
            if not complete:  # the client waits for this before it sends the body
                self.send_now(_CONTINUE)
        return complete

    def send_now(self, data: bytes) -> None:
        """Best effort, never blocking the loop: a short answer on an idle socket."""
        sock = self.socket
        try:
            timeout = sock.gettimeout()
            sock.settimeout(0)
            try:
                sock.send(data)
            finally:
                sock.settimeout(timeout)
        except (OSError, ValueError):
            pass

    def close(self):
        client, self.client = self.client, None
        if client is not None:
            self.server.connections_closed(client)
        super().close()


class Connections(cheroot_connections.ConnectionManager):
    """The connection loop: accepts within the caps, reads requests whole (Connection),
    hands complete ones to the workers, expires slow and idle ones."""

    def _from_server_socket(self, server_socket):
        """cheroot's accept, but a TLS handshake is left to the loop (cheroot's would block
        it for the socket timeout), and the connection is parked, not handed on."""
        try:
            sock, addr = server_socket.accept()
        except OSError:  # nothing to accept after all (another wakeup took it), or EMFILE
            return None
        sock.settimeout(self.server.timeout)
        adapter = self.server.ssl_adapter
        makefile = MakeFile
        if adapter is not None:
            sock = adapter.context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)
            makefile = adapter.makefile
        conn = self.server.ConnectionClass(self.server, sock, makefile)
        conn.remote_addr, conn.remote_port = addr[0], addr[1]
        conn.ssl_env = {}
        conn.handshaking = adapter is not None
        conn.head_since = time.monotonic()
        refusal = self.server.admit(conn)
        if refusal:
            if not conn.handshaking:
                conn.send_now(response(503, refusal, "Retry-After: 5\r\n"))
            conn.close()
        else:
            self.examine(conn)
        return None

    def put(self, conn):
        """A worker is done with conn and it stays open: read its next request here."""
        conn.last_used = time.time()
        conn.next_request()
        self.examine(conn)

    def examine(self, conn) -> None:
        """Hand conn to a worker if a whole request is buffered, else wait for more."""
        state = conn.receive()
        if state:
            self.server.dispatch(conn)
        elif state is None:
            conn.close()
        else:
            self._selector.register(conn.socket.fileno(), cheroot_connections.selectors
                                    .EVENT_READ, data=conn)

    def _expire(self, threshold):
        """Close what idled past the keep-alive timeout, or is slow to send a request: 408
        if it sent part of one; cut what is slow to take its answer."""
        self._cut_slow_answers()
        late = time.monotonic() - HEAD_TIMEOUT
        for fd, conn in [(fd, c) for fd, c in self._selector.connections
                         if c is not self.server and (
                             c.last_used < threshold if c.head_since is None
                             else c.head_since < late)]:
            self._selector.unregister(fd)
            if conn.head_since is not None and conn.buffered() and not conn.handshaking:
                conn.send_now(response(408, f"the request was not complete within "
                                            f"{HEAD_TIMEOUT:g} s"))
            conn.close()

    def _cut_slow_answers(self) -> None:
        """A worker still writing an answer (not an event stream) ANSWER_TIMEOUT seconds
        after it began: its client reads too slowly, or not at all. Shut the socket: the
        blocked send fails at once and the worker is free."""
        server, late = self.server, time.monotonic() - ANSWER_TIMEOUT
        with server.answering_lock:  # a worker may be done, and on its next answer
            slow = [c for c, since in server.answering.items()
                    if since < late and c not in server.streams]
            for conn in slow:
                del server.answering[conn]
        for conn in slow:
            server.answers_cut += 1
            force_close(conn)


class Admission:
    """Open connections, per client address and in all, against the caps."""

    def __init__(self):
        self._lock = threading.Lock()
        self._clients: collections.Counter = collections.Counter()
        self._open = 0
        self.refused = 0

    def admit(self, conn) -> Optional[str]:
        """None if conn may stay (it is counted until closed), else why not."""
        with self._lock:
            if self._open >= MAX_CONNECTIONS:
                why = f"more than {MAX_CONNECTIONS} open connections; retry later"
            elif self._clients[conn.remote_addr] >= MAX_PER_CLIENT:
                why = f"more than {MAX_PER_CLIENT} open connections from one address"
            else:
                self._open += 1
                self._clients[conn.remote_addr] += 1
                conn.client = conn.remote_addr
                return None
            self.refused += 1
            return why

    def connections_closed(self, client: str) -> None:
        with self._lock:
            self._open -= 1
            self._clients[client] -= 1
            if not self._clients[client]:
                del self._clients[client]


def force_close(conn) -> None:
    """Wake a worker blocked writing to a client that stopped reading: shut the socket
    both ways (cheroot's own force-close shuts reading only, which leaves a blocked send
    waiting out the socket timeout), and have its close reset the connection rather than
    leave the kernel trickling out megabytes still queued to that client."""
    if conn is None:
        return
    try:  # under TLS too: the fd
        socket.socket.setsockopt(conn.socket, socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
        socket.socket.shutdown(conn.socket, socket.SHUT_RDWR)
    except (OSError, TypeError):
        pass
