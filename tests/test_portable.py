"""Answers that must not change with the Python version netmon runs on (3.9 to 3.13):
HTTP reason phrases and the timestamps the filters accept. Each expectation is written
out here rather than taken from the running interpreter."""
import datetime as dt
import io

import pytest

from netmon.filters import FilterError, parse_time
from netmon.testing import synthetic_monitor
from netmon.web import make_app
from netmon.web.limits import MAX_BODY_BYTES, REASONS

UTC = dt.timezone.utc


def status_line(app, method, path, body=b""):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
               "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": io.StringIO(), "CONTENT_LENGTH": str(len(body))}
    started = []
    b"".join(app(environ, lambda status, headers, exc_info=None: started.append(status)))
    return started[0]


@pytest.mark.parametrize("method, path, body, line", [
    ("GET", "/", b"", "200 OK"),
    ("GET", "/nope", b"", "404 Not Found"),
    ("GET", "/api/connection-summary", b"", "405 Method Not Allowed"),
    ("POST", "/api/connection-summary", b"x", "400 Bad Request"),
    ("POST", "/api/connection-summary", b" " * (MAX_BODY_BYTES + 1),
     "413 Request Entity Too Large"),
])
def test_status_lines_are_netmons_own(method, path, body, line):
    assert status_line(make_app(synthetic_monitor()), method, path, body) == line


def test_reason_table_is_fixed():
    # the phrases netmon has always sent, whatever http.client calls them this version
    assert (REASONS[413], REASONS[414], REASONS[422], REASONS[416]) == (
        "Request Entity Too Large", "Request-URI Too Long", "Unprocessable Entity",
        "Requested Range Not Satisfiable")


@pytest.mark.parametrize("text, expected", [
    ("2026-11-27T14:30:00Z", dt.datetime(2026, 11, 27, 14, 30, tzinfo=UTC)),
    ("2026-11-27t14:30:00z", dt.datetime(2026, 11, 27, 14, 30, tzinfo=UTC)),
    ("2026-11-27 14:30:00+00:00", dt.datetime(2026, 11, 27, 14, 30, tzinfo=UTC)),
    ("2026-11-27T14:30:00.5Z", dt.datetime(2026, 11, 27, 14, 30, 0, 500000, tzinfo=UTC)),
    ("2026-11-27T14:30:00.12Z", dt.datetime(2026, 11, 27, 14, 30, 0, 120000, tzinfo=UTC)),
    ("2026-11-27T14:30:00.123456789Z",
     dt.datetime(2026, 11, 27, 14, 30, 0, 123456, tzinfo=UTC)),
    ("2026-11-27T16:30:00+02:00", dt.datetime(2026, 11, 27, 14, 30, tzinfo=UTC)),
    ("2026-11-27T09:00:00-05:30", dt.datetime(2026, 11, 27, 14, 30, tzinfo=UTC)),
])
def test_rfc3339_accepted_everywhere(text, expected):
    assert parse_time("since", text) == expected


@pytest.mark.parametrize("text", [
    "2026-11-27T14:30Z",          # no seconds: 3.11+'s fromisoformat takes it
    "20261127T143000Z",           # basic format: likewise
    "2026-W48-5T14:30:00Z",       # week date: likewise
    "2026-11-27",                 # a date alone
    "2026-11-27T14:30:00+0200",   # offset without its colon
    "2026-11-27T14:30:00+02:75",  # minutes out of range
    "2026-11-27T14:30:00+24:00",  # offset out of range
    "2026-02-30T14:30:00Z",       # no such day
    "2026-11-27T14:30:00.Z",      # empty fraction
    "2026-11-27T14:30:00",        # no zone
    "2026-11-27T14:30:00Z ",      # trailing space
])
def test_rfc3339_rejected_everywhere(text):
    with pytest.raises(FilterError) as e:
        parse_time("since", text)
    assert str(e.value).startswith("since: ")
