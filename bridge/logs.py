"""Structured logging with secrets redacted, whatever a library decides to print."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable

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
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out).decode()


def setup_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> RedactingFilter:
    """Configure the root logger once per process; returns the filter to add secrets to."""
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
    # aiohttp's access log would print every transaction; keep it at warning
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return redactor
