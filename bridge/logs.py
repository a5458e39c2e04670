"""Structured logging with secrets redacted, whatever a library decides to print.

One line per meaningful event: Enclave's own loggers log at ``logging.level``; the
libraries underneath (APScheduler prints two INFO lines per timer run, aiohttp one per
request, matrix-nio one per sync...) at ``logging.libraries`` (default WARNING), so their
warnings and errors still show. ``logging.loggers`` sets any logger's level by name.
In JSON, each line is one object: ``ts``, ``level``, ``logger``, ``message``, the
exception (``exc``) if any, and the structured fields a call passes in ``extra=``.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping

import orjson

_TOKEN_PATTERNS = (
    re.compile(r"(access_token=)[^&\s\"']+", re.I),
    # the console's single sign-on callback (?loginToken=): a one-time sign-in
    re.compile(r"(loginToken=)[^&\s\"']+", re.I),
    re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=\-]+", re.I),
    re.compile(r"((?:as|hs)_token[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+", re.I),
)
REDACTED = "<redacted>"


class RedactingFilter(logging.Filter):
    """Replaces known secret values and token-shaped substrings in every record."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, REDACTED)
        for pat in _TOKEN_PATTERNS:
            text = pat.sub(lambda m: m.group(1) + REDACTED, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = self.redact(msg)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        record.msg, record.args = clean, None
        # structured fields (``extra=``) reach JSON lines too
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and key not in _RECORD_ATTRS:
                record.__dict__[key] = self.redact(value)
        return True


# The loggers of the libraries Enclave runs on: held at ``logging.libraries``.
LIBRARY_LOGGERS = ("apscheduler", "aiohttp", "asyncio", "nio", "peewee", "ldap3", "asyncpg",
                   "scim2_server", "urllib3", "markdown_it", "PIL", "multipart", "vodozemac")
# What every LogRecord has; anything else on a record came from ``extra=`` (JSON fields).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, exc, and ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str, fmt: str, secrets: Iterable[str] = (), *,
                  libraries: str = "WARNING",
                  loggers: Mapping[str, str] | None = None) -> RedactingFilter:
    """Configure the root logger once per process; returns the filter to add secrets to.

    ``level``: Enclave's own loggers (and any not named below); ``libraries``: those of
    :data:`LIBRARY_LOGGERS`; ``loggers``: a level per logger name, applied last."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JSONFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    redactor = RedactingFilter(secrets)
    handler.addFilter(redactor)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(libraries)
    # aiohttp's access log would print every transaction: never below WARNING unless a
    # logger level below asks for it by name
    logging.getLogger("aiohttp.access").setLevel(
        max(logging.WARNING, logging.getLevelName(libraries)))
    for name, lvl in (loggers or {}).items():
        logging.getLogger(name).setLevel(lvl)
    # Python's warnings (a library's DeprecationWarning) become log lines too: a JSON log
    # holds nothing but JSON
    logging.captureWarnings(True)
    return redactor
