"""Service logs: text or JSON lines, each carrying the request id and trace id of the work it is about.

``bind_request(request_id)`` at the start of an RPC handler ties every line
logged while serving that call (same asyncio task) to the request; the trace
and span ids come from the current OpenTelemetry span (empty when tracing is
off or the line is not about a request).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from pdserve import telemetry

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("pdserve_request_id", default="")
FORMATS = ("text", "json")


def bind_request(request_id: str) -> None:
    """Lines logged from here on in this task (an RPC handler's) carry ``request_id``."""
    _request_id.set(request_id)


class _Context(logging.Filter):
    """Puts ``request_id``, ``trace_id`` and ``span_id`` on every record (empty when there are none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        record.trace_id, record.span_id = telemetry.current_ids()
        return True


def escape(text: str) -> str:
    """``text`` with control characters written as escapes: a value a client chose (an id, a prompt's
    echo in an error) can neither start a forged line nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class TextFormatter(logging.Formatter):
    """One line per record (a traceback follows on lines of its own); the message and ids escaped."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{k}={escape(str(v))}" for k in ("request_id", "trace_id") if (v := getattr(record, k, ""))]
        return f"{line} [{' '.join(ids)}]" if ids else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, service, logger, message, request_id,
    trace_id, span_id, and the exception's traceback where there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": escape(record.getMessage()),
            "request_id": escape(getattr(record, "request_id", "")),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, service: str, fmt: str = "text") -> None:
    """Root logging to stderr in ``fmt`` ("text" or "json") at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
