"""Logging set-up: logfmt or JSON lines on stderr, one child logger per component.

Context goes in ``extra``: ``log.info("attached", extra={"interface": "veth0"})`` prints
``level=info logger=interfaces msg=attached interface=veth0``."""

from __future__ import annotations

import json
import logging
import sys
import time

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


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger(ROOT)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
