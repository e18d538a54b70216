"""Logging set-up: logfmt or JSON lines on stderr, one child logger per component.

Context goes in ``extra``: ``log.info("attached", extra={"interface": "veth0"})`` prints
``level=info logger=interfaces msg=attached interface=veth0``.

When stderr cannot be written (closed, or a pipe whose reader is gone: EPIPE), the exporter
goes on serving metrics: a node agent must not stop counting because its log collector died.
Each line that could not be written is dropped and counted in
ebpf_net_exporter_log_write_failures_total, so the loss is visible where the metrics are."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

ROOT = "ebpf_net_exporter"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def get(component: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{component}")


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _component(record: logging.LogRecord) -> str:
    return record.name.removeprefix(ROOT + ".") if record.name != ROOT else "main"


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


def _fields(formatter: logging.Formatter, record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": _component(record),
        "msg": record.getMessage(),
        **_context(record),
    }
    if record.exc_info and record.levelno <= logging.DEBUG:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(self, record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({k: v if isinstance(v, (int, float, bool)) else str(v)
                           for k, v in _fields(self, record).items()})


class _Failures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1


_failures = _Failures()


class DroppingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that counts a line it cannot write, instead of printing a "Logging
    error" traceback to the very stream that just failed."""

    def handleError(self, record: logging.LogRecord) -> None:
        _failures.add()


class LogFailuresCollector(Collector):
    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "ebpf_net_exporter_log_write_failures",
            "Log lines that could not be written (stderr closed or its reader gone).",
            value=_failures.count)


def setup(level: str, fmt: str) -> None:
    handler = DroppingStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger(ROOT)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def set_level(level: str) -> None:
    logging.getLogger(ROOT).setLevel(level.upper())
