"""Log lines as text (the default) or as one JSON object a line (--log-format json, like
node_exporter's --log.format=json), for log collectors that parse fields."""
from __future__ import annotations

import datetime as _dt
import json
import logging

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """{"time": RFC 3339 UTC with microseconds, "level", "logger", "msg"[, "error"]}."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def formatter(fmt: str) -> logging.Formatter:
    return JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def line(fmt: str, msg: str, level: str = "info") -> str:
    """A line netmon prints itself (the startup line, a fatal error), in the format."""
    if fmt != "json":
        return msg
    rec = logging.LogRecord("netmon", getattr(logging, level.upper()), __file__, 0, msg,
                            None, None)
    return JSONFormatter().format(rec)
