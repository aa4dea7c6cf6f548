"""Application and access logs: text or JSON lines, to stderr or a file that
SIGUSR1 reopens (for logrotate). Messages never carry keys or certificates:
nothing in edge logs a PEM, and the access log has its own fixed fields."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from edge.config import LogConfig


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "edge.access":
            return record.getMessage()  # a whole line already (JSON or combined), for log tools
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "edge.access":
            return record.getMessage()  # already one JSON object
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class ReopenableFileHandler(logging.StreamHandler):
    """A file handler whose file can be reopened after logrotate moved it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(open(path, "a", buffering=1))  # noqa: SIM115 - owned by the handler

    def reopen(self) -> None:
        self.acquire()
        try:
            old, self.stream = self.stream, open(self.path, "a", buffering=1)  # noqa: SIM115
            old.close()
        finally:
            self.release()


def setup(config: LogConfig) -> logging.Handler:
    handler: logging.Handler = ReopenableFileHandler(config.file) if config.file else logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    return handler


def reopen() -> None:
    """SIGUSR1: reopen log files."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()
