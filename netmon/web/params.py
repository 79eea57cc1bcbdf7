"""Reading a request: one parser for query and body parameters, the filters compiled once
from them, and those filters reported back as the store applies them. A bad value is a
FilterError naming it (the app answers 400) or a 400 HTTPError."""
from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import re
from typing import Optional, Sequence

import bottle

from ..event import rfc3339
from ..filters import FILTER_NAMES, Filter, FilterError, compile_filter, parse_time
from .limits import MAX_BODY_BYTES

JSON_MSG = "invalid JSON request body"
NUMERIC = {"pid", "ppid", "port", "sport", "after", "limit", "duration"}  # decimal text: int
_MIN_TIME = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def bad_request(message: str) -> bottle.HTTPError:
    return bottle.HTTPError(400, message)


def request_params(allowed: Optional[Sequence[str]] = None) -> dict:
    """The request's parameters as a dict; empty values are absent; decimal text becomes an
    int where a number is expected (NUMERIC).

    allowed: the query parameters an endpoint takes; any other, a repeated one, or a query
    string that is not UTF-8 is a 400 naming it. Without `allowed`: a GET's query string
    read leniently (unknown names ignored, the last of repeated values), else the JSON
    object body."""
    if allowed is None and bottle.request.method != "GET":
        return _json_object()
    query = bottle.request.query
    if allowed is not None:
        try:
            query = query.decode()
        except UnicodeError:
            raise bad_request("the query string is not valid UTF-8") from None
        unknown = sorted(set(query) - set(allowed))
        if unknown:
            raise bad_request(f"unknown query parameter {', '.join(unknown)}; "
                              f"allowed: {', '.join(allowed)}")
    out = {}
    for key in query:
        values = query.getall(key)
        if len(values) > 1 and allowed is not None:
            raise FilterError(key, "given more than once")
        v = values[-1]
        if v:
            out[key] = int(v) if key in NUMERIC and re.fullmatch(r"[0-9]{1,20}", v) else v
    return out


def _no_duplicate_keys(pairs) -> dict:
    """{"pid": 1, "pid": 2} is ambiguous: refuse it rather than pick one."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _json_object() -> dict:
    """The request body as a JSON object: 411 if chunked, 413 past MAX_BODY_BYTES, 400 if
    not a JSON object."""
    if bottle.request.chunked:  # servers de-chunk differently; a length is simple and safe
        raise bottle.HTTPError(411, "send the body with a Content-Length header, not chunked")
    if bottle.request.content_length > MAX_BODY_BYTES:
        raise bottle.HTTPError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    raw = bottle.request.body.read()
    try:
        body = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError):  # bad UTF-8, duplicate keys, 8000 nested [
        raise bad_request(JSON_MSG) from None
    if not isinstance(body, dict):
        raise bad_request(JSON_MSG)
    return body


def request_filter(params: dict) -> Filter:
    """The filters among `params`, compiled once for every query the request makes. An
    age like 300s becomes an instant now, so a stream's window does not slide."""
    f = {k: params[k] for k in FILTER_NAMES if k in params}
    now = _dt.datetime.now(_dt.timezone.utc)
    for k in ("since", "until"):
        if k in params:
            t = parse_time(k, params[k])
            f[k] = now - min(t, now - _MIN_TIME) if isinstance(t, _dt.timedelta) else t
    if "after" in params:
        f["after_seq"] = params["after"]
    return compile_filter(**f)


def _instant(t: _dt.datetime) -> str:
    try:
        return rfc3339(t.astimezone(_dt.timezone.utc))
    except OverflowError:  # year 1 or 9999 moved past the calendar's edge
        return t.isoformat()


def understood(where: Filter) -> dict:
    """The filters as the store applies them: names normalised, times absolute (RFC 3339),
    networks canonical."""
    f = where.keywords
    kind = f.get("kind", "connect")
    out = {"kind": "all" if kind is None else kind.lower()}
    for k, v in f.items():
        if k in ("family", "protocol"):
            out[k] = v.lower()
        elif k == "result":
            out[k] = v if v in ("ok", "error") else v.upper()
        elif k == "dest":
            out[k] = v if v[0] in "/@" else str(ipaddress.ip_network(v, strict=False))
        elif k == "src":
            out[k] = str(ipaddress.ip_network(v, strict=False))
        elif k in ("since", "until"):
            out[k] = _instant(v)
        elif k == "after_seq":
            out["after"] = v
        elif k != "kind":
            out[k] = v
    return out
