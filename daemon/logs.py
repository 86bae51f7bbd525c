"""Logging: JSON lines by default (one object per line, fields from `extra=`), or text."""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any, TextIO

# Set for the duration of each gRPC call by the daemon's servers (daemon.metrics).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def _add_request_id(record: logging.LogRecord) -> bool:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        record.request_id = request_id
    return True


class _Handoff(logging.handlers.QueueHandler):
    """Hands records to the writer thread; formats and writes nothing on the caller's thread.

    (The standard QueueHandler formats the whole record before queueing it, for
    pickling to another process: the very work this handler is here to move.)
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The arguments may change once the call returns: merge them now (cheap).
        record.msg = record.getMessage()
        record.args = None
        return record


class LogWriter:
    """Where log lines go; close() writes every queued line before it returns."""

    def __init__(self, handler: logging.Handler, listener: logging.handlers.QueueListener | None):
        self._handler = handler
        self._listener = listener

    def close(self) -> None:
        if self._listener is None:
            return
        self._listener.stop()  # drains the queue, then joins the writer thread
        self._listener = None
        # Whatever is logged after this (at exit) is written at once.
        logging.getLogger().handlers[:] = [self._handler]


def configure(
    log_format: str = "json",
    level: str = "info",
    *,
    background: bool = False,
    stream: TextIO | None = None,
) -> LogWriter:
    """Log to `stream` (stderr) in `log_format` at `level` and above.

    background: for `nodeplug run`, whose event loop then only makes records and
    queues them (formatting JSON and writing a line cost 100-150 us, per Allocate
    among others): a writer thread formats and writes the lines. Process-wide, as
    logging's own settings are. Call the result's close() before exit.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not background:
        handler.addFilter(_add_request_id)
        root.handlers[:] = [handler]
        return LogWriter(handler, None)
    # Nor do records need their caller's frame, thread or process: no formatter here
    # prints them, and finding them is most of what a log call costs (the logging
    # HOWTO's "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handoff = _Handoff(records)
    # The request id lives in the caller's context: read it before the record leaves.
    handoff.addFilter(_add_request_id)
    handler.addFilter(_add_request_id)  # for lines written directly after close()
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    root.handlers[:] = [handoff]
    return LogWriter(handler, listener)
