"""The limits of the HTTP side and the body of every error answer: shared by the server
(cheroot's own answers), the guard (401, 403) and the routes."""
from __future__ import annotations

import json

import bottle

from .. import _core

MAX_BODY_BYTES = 16 * 1024
MAX_STREAMS = 32  # concurrent /api/events/stream clients; the server adds a thread for each
MAX_DURATION = 3600
MAX_LIMIT = 1000
MAX_EVENTS_LIMIT = 10000
MAX_ANSWER_EVENTS = 10000  # events in one list-connections answer, whatever pids x limit
DEFAULT_LIMIT = 100
MAX_PID = 2**32 - 1
COMM_BYTES = _core.COMM_LEN - 1  # the NUL-terminated comm of the record


# netmon's reason phrases, fixed: Python's own table (which Bottle copies) renamed some in
# 3.13 (413 "Content Too Large", 422 "Unprocessable Content"), and an answer must not
# change with the interpreter it runs on
REASONS = {200: "OK", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Request Entity Too Large", 414: "Request-URI Too Long",
           416: "Requested Range Not Satisfiable", 422: "Unprocessable Entity",
           429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


def reason(status: int) -> str:
    return REASONS.get(status) or bottle.HTTP_CODES.get(status, "Unknown")


def status_line(status: int) -> str:
    return f"{status} {reason(status)}"


def error_body(status: int, message: str) -> str:
    """The JSON body of every error answer, from the app and from the server alike."""
    return json.dumps({"error": reason(status), "message": message})
