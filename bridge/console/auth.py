"""Sign-in through the homeserver and server-side sessions for the console.

The homeserver checks the password (or the SSO login token); Enclave never sees a stored
password and keeps no device: the access token is used once to learn who signed in and is
logged out at once. Who may use the console is then decided from the directory view
Enclave syncs (``decide_console_access``), at sign-in and again on every request, so a
person deactivated or moved out of a listed group loses an open session with the next
click.
"""

from __future__ import annotations

import hashlib
import logging
import secrets as pysecrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ..config.console import ConsoleConfig
from ..policy.console import (
    ConsoleAccess,
    SessionState,
    decide_console_access,
    decide_login_throttle,
    decide_session_alive,
    keep_recent,
)
from ..store.base import AuditRecord, ConsoleSession
from ..store.domains import AuditStore, ConsoleSessionStore, DirectoryStore

log = logging.getLogger(__name__)

THROTTLE_WINDOW_MS = 15 * 60_000


def hash_session_id(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Signed:
    """A live session of a person allowed in (re-decided for this request)."""

    raw_id: str
    user_id: str
    access: ConsoleAccess
    csrf: str


@dataclass(frozen=True)
class SignIn:
    """The outcome of a sign-in attempt: ``raw_id`` set when a session was made."""

    ok: bool
    message: str
    user_id: str | None = None
    raw_id: str | None = None


class ConsoleAuth:
    """Homeserver sign-in, sessions, and the audit of both."""

    def __init__(self, config: ConsoleConfig, *, sessions: ConsoleSessionStore,
                 directory: DirectoryStore, audit: AuditStore,
                 http: Callable[[], aiohttp.ClientSession], homeserver_url: str,
                 clock_ms: Callable[[], int]):
        self.config = config
        self.sessions = sessions
        self.directory = directory
        self.audit = audit
        self._http = http
        self.homeserver_url = homeserver_url
        self.clock_ms = clock_ms
        self._failures: dict[str, list[int]] = {}
        self.idle_ms = config.idle_timeout_minutes * 60_000
        self.max_age_ms = config.max_session_hours * 3_600_000

    # -- the homeserver ----------------------------------------------------------------
    async def login_flows(self) -> set[str]:
        """The login types the homeserver offers (``m.login.password``, ``m.login.sso``)."""
        try:
            async with self._http().get(
                    self.homeserver_url + "/_matrix/client/v3/login",
                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                body = await resp.json(content_type=None)
            return {f.get("type", "") for f in body.get("flows", [])}
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as e:
            log.warning("console: cannot read the homeserver's login flows: %s", e)
            return {"m.login.password"}

    async def _homeserver_login(self, body: dict[str, Any]) -> tuple[str | None, str]:
        """(user id, "") or (None, why). The token is logged out at once (no device)."""
        http = self._http()
        try:
            # the root's session has no JSON serializer of its own (json_serialize=None)
            data = orjson.dumps({**body, "initial_device_display_name":
                                 "Enclave console sign-in (logged out at once)"})
            async with http.post(self.homeserver_url + "/_matrix/client/v3/login",
                                 data=data, headers={"Content-Type": "application/json"},
                                 timeout=aiohttp.ClientTimeout(total=10)) as resp:
                got = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return None, f"the homeserver did not answer ({type(e).__name__})"
        if status != 200 or not isinstance(got, dict) or "user_id" not in got:
            errcode = got.get("errcode") if isinstance(got, dict) else None
            return None, f"the homeserver refused the sign-in ({errcode or status})"
        token = got.get("access_token")
        if token:
            try:
                async with http.post(self.homeserver_url + "/_matrix/client/v3/logout",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"},
                                     data=b"{}",
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    if resp.status != 200:
                        log.warning("console: logging the sign-in token out answered %s",
                                    resp.status)
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("console: the sign-in token was not logged out: %s", e)
        return str(got["user_id"]), ""

    # -- sign-in -----------------------------------------------------------------------
    def _throttled(self, keys: list[str], now: int) -> bool:
        for k in keys:
            fails = keep_recent(self._failures.get(k, []), now, THROTTLE_WINDOW_MS)
            self._failures[k] = fails
            if not decide_login_throttle(fails, now, window_ms=THROTTLE_WINDOW_MS,
                                         limit=self.config.max_failed_logins):
                return True
        return False

    def _failed(self, keys: list[str], now: int) -> None:
        for k in keys:
            self._failures.setdefault(k, []).append(now)
        if len(self._failures) > 10_000:  # bounded memory under a spray of names
            for k in list(self._failures)[:5_000]:
                del self._failures[k]

    async def _audit(self, kind: str, outcome: str, actor: str | None, *,
                     rule_id: str | None = None, reason: str | None = None,
                     detail: str | None = None, user_id: str | None = None,
                     room_id: str | None = None) -> None:
        await self.audit.add_audit(AuditRecord(
            ts=self.clock_ms(), source="console", kind=kind, outcome=outcome, actor=actor,
            user_id=user_id, room_id=room_id, rule_id=rule_id, reason=reason, detail=detail))

    async def sign_in_password(self, username: str, password: str, remote: str) -> SignIn:
        username = username.strip()
        if not username or not password:
            return SignIn(False, "give your Matrix user name and password")
        return await self._sign_in(
            {"type": "m.login.password",
             "identifier": {"type": "m.id.user", "user": username}, "password": password},
            claimed=username, remote=remote, method="password")

    async def sign_in_token(self, login_token: str, remote: str) -> SignIn:
        if not login_token:
            return SignIn(False, "the single sign-on answer carried no login token")
        return await self._sign_in({"type": "m.login.token", "token": login_token},
                                   claimed="(single sign-on)", remote=remote, method="sso")

    async def _sign_in(self, body: dict[str, Any], *, claimed: str, remote: str,
                       method: str) -> SignIn:
        now = self.clock_ms()
        keys = [f"user:{claimed.lower()}", f"addr:{remote}"]
        # Until the homeserver vouches for the sign-in, the name typed is only a claim:
        # it is recorded as the detail, never as the actor (anyone can type anyone's name)
        if self._throttled(keys, now):
            await self._audit("console.sign_in", "refused", None,
                              rule_id="console.throttled",
                              reason="too many failed sign-ins",
                              detail=f"{method} as {claimed!r} from {remote}")
            return SignIn(False, "too many failed sign-ins; try again later")
        user_id, why = await self._homeserver_login(body)
        if user_id is None:
            self._failed(keys, now)
            await self._audit("console.sign_in", "refused", None,
                              rule_id="console.homeserver", reason=why,
                              detail=f"{method} as {claimed!r} from {remote}")
            return SignIn(False, "sign-in failed: wrong user name or password"
                          if "M_FORBIDDEN" in why else f"sign-in failed: {why}")
        staff = await self.directory.directory_person(user_id)
        access = decide_console_access(user_id, staff, self.config.groups)
        if not access.allow:
            self._failed(keys, now)
            await self._audit("console.sign_in", "refused", user_id, user_id=user_id,
                              rule_id=access.rule_id, reason=access.reason,
                              detail=f"{method} from {remote}")
            return SignIn(False, "your account may not use the console", user_id=user_id)
        raw = pysecrets.token_urlsafe(32)
        await self.sessions.sessions_expire(now - self.idle_ms)
        await self.sessions.session_create(ConsoleSession(
            id_hash=hash_session_id(raw), user_id=user_id, roles=tuple(sorted(access.roles)),
            csrf=pysecrets.token_urlsafe(32), created_at=now, last_seen=now))
        await self._audit("console.sign_in", "applied", user_id, user_id=user_id,
                          rule_id=access.rule_id, reason=access.reason,
                          detail=f"{method} from {remote}")
        return SignIn(True, "signed in", user_id=user_id, raw_id=raw)

    # -- sessions ----------------------------------------------------------------------
    async def resolve(self, raw_id: str | None) -> Signed | None:
        """The live session behind a cookie, its person re-decided against the directory;
        None (and the session dropped) when it timed out or the person lost access."""
        if not raw_id:
            return None
        h = hash_session_id(raw_id)
        s = await self.sessions.session_get(h)
        if s is None:
            return None
        now = self.clock_ms()
        alive, why = decide_session_alive(SessionState(s.created_at, s.last_seen), now,
                                          idle_ms=self.idle_ms, max_age_ms=self.max_age_ms)
        if not alive:
            await self.sessions.session_delete(h)
            await self._audit("console.session_end", "applied", s.user_id, user_id=s.user_id,
                              rule_id="console.session", reason=why)
            return None
        staff = await self.directory.directory_person(s.user_id)
        access = decide_console_access(s.user_id, staff, self.config.groups)
        if not access.allow:
            await self.sessions.session_delete(h)
            await self._audit("console.session_end", "refused", s.user_id, user_id=s.user_id,
                              rule_id=access.rule_id, reason=access.reason)
            return None
        await self.sessions.session_touch(h, now, tuple(sorted(access.roles)))
        return Signed(raw_id, s.user_id, access, s.csrf)

    async def forget(self, raw_id: str | None) -> None:
        """Drop the session behind a cookie the browser arrived with at a new sign-in (the
        new session gets a new id; the old one is not kept alive beside it)."""
        if raw_id:
            await self.sessions.session_delete(hash_session_id(raw_id))

    async def sign_out(self, signed: Signed) -> None:
        await self.sessions.session_delete(hash_session_id(signed.raw_id))
        await self._audit("console.sign_out", "applied", signed.user_id,
                          user_id=signed.user_id)

    async def record(self, signed: Signed, kind: str, outcome: str, **fields: Any) -> None:
        """Audit one console action under the signed-in person's own id."""
        await self._audit(kind, outcome, signed.user_id, **fields)
