"""One logging setup for every chatbus process: text or JSON lines, with the request's context.

The context (request id, API key name, model, node) lives in context variables that the gateway and
the node set per request; the JSON formatter adds whichever are set to every line, as do `extra=`
fields of the same names. `--log-format json` (or $CHATBUS_LOG_FORMAT, which `chatbus up` passes
on to everything it starts) selects JSON.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

__all__ = ["CONTEXT", "FIELDS", "JsonFormatter", "bind", "setup_logging"]

FIELDS = ("request_id", "key", "model", "node")
CONTEXT: dict[str, contextvars.ContextVar[str]] = {
    f: contextvars.ContextVar(f"chatbus_log_{f}", default="") for f in FIELDS
}
FORMATS = ("text", "json")


def bind(**fields: str) -> None:
    """Set context fields for the rest of the current task (and the tasks it starts)."""
    for name, value in fields.items():
        CONTEXT[name].set(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, the context fields that are set, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None) or CONTEXT[name].get()
            if value:
                line[name] = value
        for name in ("tokens", "prompt_tokens", "completion_tokens", "finish_reason", "duration_s", "status"):
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(
    level: int | str,
    fmt: str | None = "text",
    text_format: str = "%(asctime)s %(name)s %(levelname)s %(message)s",
) -> None:
    """Configure the root logger once per process (replacing earlier handlers) in `fmt`."""
    fmt = fmt or "text"
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
