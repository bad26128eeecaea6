"""What every process needs: the event loop (uvloop) and logging (text or JSON)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (the stack's event loop)."""
    return uvloop.run(main)


#: Our loggers follow ENVPIPE_LOG_LEVEL; everyone else's stay at WARNING or above.
_OWN_LOGGERS = ("envpipe", "pipeline", "workers")
#: At DEBUG, botocore logs whole KMS responses, and a GenerateDataKey response holds the
#: plaintext DEK. These loggers never go below WARNING, whatever the level asked for.
_NEVER_DEBUG = ("botocore", "aiobotocore", "urllib3")

#: The fields of a JSON log line, in order. Exceptions add `error` (type: message) and
#: `traceback`. Messages never carry key material or payload bytes.
JSON_LOG_FIELDS = ("ts", "level", "logger", "message", "pid")


class JsonFormatter(logging.Formatter):
    """One orjson object per line, with the stable fields of JSON_LOG_FIELDS."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line["error"] = f"{type(error).__name__}: {error}"
            line["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Logs on stderr, as text or JSON (ENVPIPE_LOG_FORMAT), at ENVPIPE_LOG_LEVEL for ours."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelName(level)))
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in _NEVER_DEBUG:
        logging.getLogger(name).setLevel(logging.WARNING)
