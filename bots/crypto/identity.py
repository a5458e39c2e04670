"""The bot device's identity on disk (``session.json``, 0600): :class:`DeviceSession`, how
the device authenticates, new device ids, nio's client acting as the device through the
appservice token, and scrubbing tokens out of what is logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

log = logging.getLogger(__name__)


SESSION_FILE = "session.json"

_TOKEN_IN_URL = re.compile(r"(access_token=)[^&\s'\"]+")


def scrub(text: object) -> str:
    """nio puts the access token in request URLs; never let one reach a log or an error."""
    return _TOKEN_IN_URL.sub(r"\1<redacted>", str(text))


# -- the device's identity on disk ---------------------------------------------------------------
APPSERVICE = "appservice"  # the device is used through the AS token (MSC4190)
TOKEN = "token"  # the device has an access token of its own (appservice login)


@dataclass(frozen=True)
class DeviceSession:
    """The bot's device: persisted in ``session.json`` (0600). ``auth``: ``appservice``
    (no token of its own: AS token + ``user_id``/``device_id``) or ``token``."""

    user_id: str
    device_id: str
    access_token: str = field(repr=False)
    pickle_key: str = field(repr=False)
    auth: str = TOKEN

    @classmethod
    def load(cls, path: Path) -> DeviceSession | None:
        """The stored session, or None when there is none (or it is unreadable)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            auth = raw.get("auth", TOKEN)
            if auth not in (APPSERVICE, TOKEN):
                raise ValueError(auth)
            return cls(user_id=raw["user_id"], device_id=raw["device_id"],
                       access_token=raw["access_token"], pickle_key=raw["pickle_key"],
                       auth=auth)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable E2EE session file %s (%s)", path,
                        type(e).__name__)
            return None

    def save(self, path: Path) -> None:
        """Write atomically, readable by the owner only (it holds an access token)."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"user_id": self.user_id, "device_id": self.device_id,
                       "access_token": self.access_token, "pickle_key": self.pickle_key,
                       "auth": self.auth}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


class TokenInvalid(Exception):
    pass


class IdentityUnusable(Exception):
    """The bot's cross-signing identity is lost or replaced elsewhere (reason: the fix)."""


def new_device_id() -> str:
    return "ENCLAVE" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(8))


def appservice_device_client(nio: Any) -> Any:
    """nio's client acting as the bot's device through the appservice token: every request
    carries ``user_id`` and ``device_id`` (appservice device masquerading, MSC4190)."""

    class AppserviceDeviceClient(nio.AsyncClient):  # type: ignore[misc,name-defined]
        async def _send(self, response_class: type, method: str, path: str,
                        *args: Any, **kwargs: Any) -> Any:
            url = list(urlparse(path))
            query = parse_qs(url[4])
            query["user_id"] = [self.user_id]
            query["device_id"] = [self.device_id]
            url[4] = urlencode(query, doseq=True)
            return await super()._send(response_class, method, urlunparse(url), *args,
                                       **kwargs)

    return AppserviceDeviceClient
