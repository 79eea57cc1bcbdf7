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


def error_body(status: int, message: str) -> str:
    """The JSON body of every error answer, from the app and from the server alike."""
    return json.dumps({"error": bottle.HTTP_CODES.get(status, "Unknown"), "message": message})
