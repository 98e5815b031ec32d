"""JSON logs: one object per line, carrying the current request's fields (request id, client,
session, part) in every line emitted while that request is handled.

A leaf module (standard library only): gunicorn.conf.py builds gunicorn's ``logconfig_dict`` from
``logging_config()``, so gunicorn's own error log and the application's logs share one format.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

ACCESS_LOGGER = "chunksvc.access"

# The request being handled by this thread; a fresh dict per request, so fields never leak
# from one request into the next one served by the same thread.
_request_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "chunksvc_request_fields", default=None
)

# An API key that reached a log message by mistake keeps only its public prefix.
_API_KEY = re.compile(r"\b(csk_[0-9a-f]{8})_[A-Za-z0-9_-]{43}")


def start_request(**fields: Any) -> None:
    _request_fields.set({name: value for name, value in fields.items() if value is not None})


def bind(**fields: Any) -> None:
    """Add fields to the current request's (no effect outside a request)."""
    current = _request_fields.get()
    if current is not None:
        current.update({name: value for name, value in fields.items() if value is not None})


def end_request() -> None:
    _request_fields.set(None)


class RequestContextFilter(logging.Filter):
    """Copies the current request's fields onto each record, in the thread that emits it."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _request_fields.get()
        if fields:
            record.request_fields = dict(fields)
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "pid", "msg", <request fields>, <fields>, "exc"}`` on one line.

    Structured data is passed as ``log.info(msg, extra={"fields": {...}})``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "request_fields", None) or {})
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _API_KEY.sub(r"\1_<redacted>", json.dumps(entry, default=str, ensure_ascii=False))


def logging_config(level: str = "info", access_log: str | None = "-") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict: JSON everywhere; errors and application logs on
    stderr; the access lines on stdout (``"-"``), in a file (a path) or nowhere (empty/None)."""
    if access_log == "-":
        access_handler: dict[str, Any] = {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"}
    elif access_log:
        # Reopens the file when logrotate moves it away.
        access_handler = {"class": "logging.handlers.WatchedFileHandler", "filename": access_log}
    else:
        access_handler = {"class": "logging.NullHandler"}
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "filters": {"request": {"()": f"{__name__}.RequestContextFilter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "json",
                "filters": ["request"],
            },
            "access": {**access_handler, "formatter": "json", "filters": ["request"]},
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            # gunicorn's access line is replaced by the application's (ACCESS_LOGGER), which knows
            # the route, client, session and part; see gunicorn.conf.py.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            ACCESS_LOGGER: {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }
