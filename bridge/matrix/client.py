"""Outgoing client for the Matrix client-server API and Synapse's admin API.

Acts as any user in the appservice's namespaces through ``?user_id=``, retries 5xx and
connection errors with exponential backoff, honours ``429`` ``retry_after_ms`` and raises
:class:`MatrixRequestError` (with ``errcode``) for everything else.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from ..kernel.retry import Backoff, retry_after_seconds

log = logging.getLogger(__name__)


class MatrixRequestError(Exception):
    """The homeserver answered with an error that retrying will not fix."""

    def __init__(self, status: int, errcode: str, error: str, method: str = "", path: str = ""):
        self.status = status
        self.errcode = errcode
        self.error = error
        self.method = method
        self.path = path
        super().__init__(f"{method} {path} -> {status} {errcode}: {error}")


class HomeserverUnavailable(Exception):
    """Retries exhausted on 5xx, 429 or connection errors: try again later."""


def q(part: str) -> str:
    """Percent-encode one path segment (room ids, user ids, event types)."""
    return quote(part, safe="")


class MatrixClient:
    """One client for the appservice; pass ``user_id`` to act as a namespace user."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        as_token: str,
        *,
        max_retries: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_rate_limited: Callable[[], None] | None = None,
        on_unreachable: Callable[[], None] | None = None,
    ):
        self._session = session
        # aiohttp (>= 3.10) silently resends a PUT once when the server closed the
        # connection without an answer: a resend of a send whose outcome is unknown that
        # would bypass the read-back before a resend (``before_resend``). Every retry is
        # made here instead; aiohttp offers no public switch for this.
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False
        self.base_url = base_url.rstrip("/")
        self._as_token = as_token
        self.max_retries = max_retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._sleep = sleep
        self._on_rate_limited = on_rate_limited
        # told of every connection failure (the completeness check dates homeserver outages)
        self.on_unreachable = on_unreachable
        self._sync_nonce = 0
        self._sync_salt = f"{random.getrandbits(48):x}"  # differs per process
        self._sessions: dict[str, str] = {}

    @property
    def appservice_token(self) -> str:
        """The AS token, for a client acting as an appservice device (a bot's E2EE device
        with MSC4190). A secret: never log it."""
        return self._as_token

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        user_id: str | None = None,
        query: dict[str, str] | None = None,
        auth: bool = True,
        access_token: str | None = None,
        before_resend: Callable[[], Awaitable[Any]] | None = None,
    ) -> Any:
        """Send one request with retries; return the decoded JSON body.

        ``access_token`` replaces the appservice token (a user's own session).
        ``before_resend`` runs before each resend after an unknown outcome (connection
        error, timeout, 5xx: the homeserver may have applied it); a non-None result is
        returned as the body instead of sending again."""
        params = dict(query or {})
        if user_id is not None:
            params["user_id"] = user_id
        token = access_token or self._as_token
        headers = {"Authorization": f"Bearer {token}"} if auth else {}
        data = orjson.dumps(json) if json is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        url = self.base_url + path
        attempt = 0
        # an earlier attempt may have been applied: it got past connecting (the answer was
        # lost or a 5xx); a refused connection sent nothing and needs no read-back
        maybe_applied = False
        while True:
            attempt += 1
            try:
                async with self._session.request(
                    method, url, params=params, data=data, headers=headers, timeout=self.timeout
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    retry_after_header = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                maybe_applied = maybe_applied or not isinstance(e, aiohttp.ClientConnectorError)
                if self.on_unreachable is not None:
                    self.on_unreachable()
                if attempt > self.max_retries:
                    raise HomeserverUnavailable(f"{method} {path}: {type(e).__name__}: {e}") from e
                delay = self._backoff(attempt)
                log.warning("homeserver unreachable (%s), retry %d in %.1fs", type(e).__name__,
                            attempt, delay)
                await self._sleep(delay)
                if (maybe_applied and before_resend is not None
                        and (found := await before_resend()) is not None):
                    return found
                continue
            body = _decode(raw)
            if 200 <= status < 300:
                return body
            errcode = body.get("errcode", "M_UNKNOWN") if isinstance(body, dict) else "M_UNKNOWN"
            error = body.get("error", "") if isinstance(body, dict) else raw[:200].decode(
                "utf-8", "replace")
            if status == 429 or errcode == "M_LIMIT_EXCEEDED":
                if self._on_rate_limited:
                    self._on_rate_limited()
                if attempt > self.max_retries:
                    raise HomeserverUnavailable(f"{method} {path}: still rate limited")
                asked = retry_after_seconds(body, retry_after_header)
                # 0 is a valid answer ("retry now"): only fall back when none was given
                delay = asked if asked is not None else self._backoff(attempt)
                log.info("rate limited on %s, waiting %.2fs as asked", path, delay)
                await self._sleep(delay)
                continue
            if status >= 500:
                if attempt > self.max_retries:
                    raise HomeserverUnavailable(f"{method} {path} -> {status} {errcode}: {error}")
                maybe_applied = True
                await self._sleep(self._backoff(attempt))
                if before_resend is not None and (found := await before_resend()) is not None:
                    return found
                continue
            raise MatrixRequestError(status, errcode, error, method, path)

    def _backoff(self, attempt: int) -> float:
        # jitter so replicas do not stampede
        return Backoff(self.backoff_initial, self.backoff_max, jitter=True).delay(
            attempt, random.random())

    # -- client-server API ---------------------------------------------------------------
    async def room_stream_position(self, user_id: str) -> str | None:
        """The homeserver's current position in its stream of room events (all rooms), from
        an empty ``/sync`` as ``user_id``: the first part of ``next_batch``. It moves
        whenever any room gets an event; None if the answer has no token. ``user_id`` must
        not be the appservice's sender: Synapse refuses it /sync."""
        # The nonce makes each request new to Synapse's sync response cache (keyed by the
        # filter among others, kept 2 minutes): a cached answer would show an old position.
        self._sync_nonce += 1
        nonce = f"{self._sync_salt}-{self._sync_nonce}"
        empty = orjson.dumps({"room": {"rooms": []}, "presence": {"types": []},
                              "account_data": {"types": []},
                              "org.enclave.nonce": nonce}).decode()
        body = await self.request("GET", "/_matrix/client/v3/sync", user_id=user_id,
                                  query={"timeout": "0", "filter": empty,
                                         "set_presence": "offline"})
        token = body.get("next_batch") if isinstance(body, dict) else None
        return token.split("_", 1)[0] if isinstance(token, str) and token else None

    async def versions(self) -> dict[str, Any]:
        return await self.request("GET", "/_matrix/client/versions", auth=False)

    async def whoami(self, user_id: str | None = None, *, device_id: str | None = None,
                     access_token: str | None = None) -> dict[str, Any]:
        """Who the token acts as: the appservice masquerading as ``user_id`` (on
        ``device_id``, MSC3202), or a user's own session's ``access_token``."""
        return await self.request("GET", "/_matrix/client/v3/account/whoami", user_id=user_id,
                                  query={"device_id": device_id} if device_id else None,
                                  access_token=access_token)

    async def get_device(self, device_id: str, *, user_id: str) -> dict[str, Any]:
        """One of ``user_id``'s devices (404 if it does not exist)."""
        return await self.request("GET", f"/_matrix/client/v3/devices/{q(device_id)}",
                                  user_id=user_id)

    async def joined_rooms(self, user_id: str) -> list[str]:
        """The rooms ``user_id`` is joined to, asked as that user."""
        body = await self.request("GET", "/_matrix/client/v3/joined_rooms", user_id=user_id)
        return list(body.get("joined_rooms", []))

    async def room_state(self, room_id: str, *, user_id: str) -> list[dict[str, Any]]:
        """A room's full current state, asked as a member (``user_id``)."""
        return await self.request("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state",
                                  user_id=user_id)

    async def room_members(self, room_id: str, *, user_id: str,
                           not_membership: str | None = None) -> list[dict[str, Any]]:
        """The room's ``m.room.member`` events, asked as a member (``user_id``)."""
        body = await self.request(
            "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/members",
            query={"not_membership": not_membership} if not_membership else None,
            user_id=user_id)
        return list(body.get("chunk") or [])

    async def get_avatar_url(self, user_id: str) -> str | None:
        """``user_id``'s avatar (asked as the appservice); None if unset."""
        body = await self.request("GET", f"/_matrix/client/v3/profile/{q(user_id)}/avatar_url")
        return body.get("avatar_url")

    async def set_avatar_url(self, user_id: str, url: str) -> None:
        await self.request("PUT", f"/_matrix/client/v3/profile/{q(user_id)}/avatar_url",
                           json={"avatar_url": url}, user_id=user_id)

    async def get_account_data(self, user_id: str, event_type: str) -> dict[str, Any] | None:
        """``user_id``'s global account data of ``event_type``; None if never set."""
        try:
            return await self.request(
                "GET", f"/_matrix/client/v3/user/{q(user_id)}/account_data/{q(event_type)}",
                user_id=user_id)
        except MatrixRequestError as e:
            if e.status == 404:
                return None
            raise

    async def set_account_data(self, user_id: str, event_type: str,
                               content: dict[str, Any]) -> None:
        await self.request(
            "PUT", f"/_matrix/client/v3/user/{q(user_id)}/account_data/{q(event_type)}",
            json=content, user_id=user_id)

    async def register_appservice_user(self, localpart: str) -> bool:
        """Create a namespace user; False if it already existed."""
        try:
            await self.request(
                "POST", "/_matrix/client/v3/register",
                json={"type": "m.login.application_service", "username": localpart,
                      "inhibit_login": True},
            )
            return True
        except MatrixRequestError as e:
            if e.errcode == "M_USER_IN_USE":
                return False
            raise

    async def get_displayname(self, user_id: str) -> str | None:
        # asked as the user themselves: a homeserver that limits profile look-ups to people
        # who share a room still answers someone about their own profile
        try:
            body = await self.request("GET", f"/_matrix/client/v3/profile/{q(user_id)}/displayname",
                                      user_id=user_id)
        except MatrixRequestError as e:
            if e.status == 404:
                return None
            raise
        return body.get("displayname")

    async def set_displayname(self, user_id: str, name: str) -> None:
        await self.request(
            "PUT", f"/_matrix/client/v3/profile/{q(user_id)}/displayname",
            json={"displayname": name}, user_id=user_id,
        )

    async def send_event(
        self, room_id: str, event_type: str, content: dict[str, Any], txn_id: str,
        *, user_id: str | None = None, device_id: str | None = None,
        before_resend: Callable[[], Awaitable[Any]] | None = None,
    ) -> str:
        """Send with a caller-chosen transaction id: a retry of the same id is deduplicated
        by the same Synapse process (see ``request`` for ``before_resend``). With
        ``device_id`` the appservice acts as that device of ``user_id`` (MSC3202), and
        Synapse keeps the transaction id in its database (deduplicated across restarts)."""
        body = await self.request(
            "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/send/{q(event_type)}/{q(txn_id)}",
            json=content, user_id=user_id, before_resend=before_resend,
            query={"device_id": device_id} if device_id is not None else None,
        )
        return body["event_id"]

    async def send_state(
        self, room_id: str, event_type: str, state_key: str, content: dict[str, Any],
        *, user_id: str | None = None,
    ) -> str:
        body = await self.request(
            "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}",
            json=content, user_id=user_id,
        )
        return body["event_id"]

    async def invite(self, room_id: str, target: str, *, user_id: str | None = None) -> None:
        await self.request("POST", f"/_matrix/client/v3/rooms/{q(room_id)}/invite",
                           json={"user_id": target}, user_id=user_id)

    async def join(self, room_id: str, *, user_id: str | None = None) -> str:
        body = await self.request("POST", f"/_matrix/client/v3/join/{q(room_id)}", json={},
                                  user_id=user_id)
        return body["room_id"]

    async def leave(self, room_id: str, *, user_id: str | None = None,
                    reason: str | None = None) -> None:
        await self.request("POST", f"/_matrix/client/v3/rooms/{q(room_id)}/leave",
                           json={"reason": reason} if reason else {}, user_id=user_id)

    async def kick(self, room_id: str, target: str, *, user_id: str | None = None,
                   reason: str | None = None) -> None:
        payload: dict[str, Any] = {"user_id": target}
        if reason:
            payload["reason"] = reason
        await self.request("POST", f"/_matrix/client/v3/rooms/{q(room_id)}/kick",
                           json=payload, user_id=user_id)

    async def create_room(self, body: dict[str, Any], *, user_id: str | None = None) -> str:
        resp = await self.request("POST", "/_matrix/client/v3/createRoom", json=body,
                                  user_id=user_id)
        return resp["room_id"]

    async def ping_appservice(self, appservice_id: str, txn_id: str) -> dict[str, Any]:
        """Ask the homeserver to ping us; it then retries any backlog at once."""
        return await self.request(
            "POST", f"/_matrix/client/v1/appservice/{q(appservice_id)}/ping",
            json={"transaction_id": txn_id},
        )

    # -- devices and end-to-end keys (a bot's E2EE device) --------------------------------
    async def put_device(self, device_id: str, *, display_name: str, user_id: str) -> None:
        """Set a device's display name as ``user_id``; through the appservice (MSC4190) this
        also creates the device when it does not exist."""
        await self.request("PUT", f"/_matrix/client/v3/devices/{q(device_id)}",
                           json={"display_name": display_name}, user_id=user_id)

    async def login_appservice(self, user_id: str, *, device_name: str,
                               device_id: str | None = None) -> dict[str, Any]:
        """Log ``user_id`` in with the appservice token (``m.login.application_service``),
        on ``device_id`` if given (else a new device): ``{device_id, access_token, …}``."""
        body: dict[str, Any] = {
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": user_id},
            "initial_device_display_name": device_name,
        }
        if device_id:
            body["device_id"] = device_id
        return await self.request("POST", "/_matrix/client/v3/login", json=body)

    async def query_keys(self, device_keys: dict[str, list[str]], *,
                         user_id: str) -> dict[str, Any]:
        """The published device and cross-signing keys of users (``{user: [device, …]}``,
        an empty list: every device), asked as ``user_id``."""
        return await self.request("POST", "/_matrix/client/v3/keys/query",
                                  json={"device_keys": device_keys}, user_id=user_id)

    async def upload_cross_signing_keys(self, body: dict[str, Any], *, user_id: str) -> None:
        """Publish ``user_id``'s cross-signing keys (master, self-signing, user-signing)."""
        await self.request("POST", "/_matrix/client/v3/keys/device_signing/upload",
                           json=body, user_id=user_id)

    async def upload_signatures(self, signatures: dict[str, Any], *,
                                user_id: str) -> dict[str, Any]:
        """Publish signatures of keys (``{user: {key id: signed object}}``); the answer's
        ``failures`` name those the homeserver refused."""
        return await self.request("POST", "/_matrix/client/v3/keys/signatures/upload",
                                  json=signatures, user_id=user_id)

    async def send_to_device(self, event_type: str, txn_id: str,
                             messages: dict[str, dict[str, Any]], *, user_id: str,
                             device_id: str) -> None:
        """Send to-device messages (``{user: {device: content}}``) as ``device_id`` of
        ``user_id`` (the appservice acting as that device, MSC3202)."""
        await self.request(
            "PUT", f"/_matrix/client/v3/sendToDevice/{q(event_type)}/{q(txn_id)}",
            json={"messages": messages}, user_id=user_id, query={"device_id": device_id})

    # -- Synapse admin API ---------------------------------------------------------------
    async def admin_get_user(self, target: str, *, admin: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", f"/_synapse/admin/v2/users/{q(target)}",
                                      user_id=admin)
        except MatrixRequestError as e:
            if e.status == 404:
                return None
            raise

    async def admin_email_owner(self, address: str, *, admin: str) -> str | None:
        """The local account that has this email address as a threepid, or None."""
        try:
            body = await self.request(
                "GET", f"/_synapse/admin/v1/threepid/email/users/{q(address)}", user_id=admin)
        except MatrixRequestError as e:
            if e.status == 404:
                return None
            raise
        owner = body.get("user_id")
        return owner if isinstance(owner, str) else None

    async def admin_put_user(self, target: str, body: dict[str, Any], *, admin: str) -> None:
        """Create or modify one account (``PUT /_synapse/admin/v2/users/{id}``)."""
        await self.request("PUT", f"/_synapse/admin/v2/users/{q(target)}", json=body,
                           user_id=admin)

    async def session_token(self, user_id: str, *, renew: bool = False) -> str:
        """An access token of ``user_id``'s own (appservice login, one fixed device).

        Needed where ``?user_id=`` means something else: the admin user list reads it as
        a filter, so masquerading there lists only the admin. Kept in memory only."""
        if renew or user_id not in self._sessions:
            body = await self.request(
                "POST", "/_matrix/client/v3/login",
                json={"type": "m.login.application_service",
                      "identifier": {"type": "m.id.user", "user": user_id},
                      "device_id": "ENCLAVE_ADMIN_API",
                      "initial_device_display_name": "Enclave admin API"})
            self._sessions[user_id] = body["access_token"]
        return self._sessions[user_id]

    async def close_sessions(self) -> int:
        """Log out every session :meth:`session_token` opened, so no admin access token
        outlives the process that used it (a CLI run would otherwise leave one behind each
        time). Returns how many were logged out; a failure is logged and the rest go on."""
        done = 0
        for user_id, token in list(self._sessions.items()):
            try:
                await self.request("POST", "/_matrix/client/v3/logout", json={},
                                   access_token=token)
                done += 1
            except (MatrixRequestError, HomeserverUnavailable) as e:
                if not (isinstance(e, MatrixRequestError) and e.status == 401):  # gone already
                    log.warning("could not log out the session of %s: %s", user_id, e)
            self._sessions.pop(user_id, None)
        return done

    async def admin_list_users(self, *, admin: str, start: int = 0,
                               limit: int = 1000) -> tuple[list[dict[str, Any]], int | None]:
        """One page of every local account, deactivated and locked ones included."""
        query = {"from": str(start), "limit": str(limit), "guests": "false",
                 "deactivated": "true", "locked": "true", "order_by": "name"}
        token = await self.session_token(admin)
        try:
            body = await self.request("GET", "/_synapse/admin/v2/users", query=query,
                                      access_token=token)
        except MatrixRequestError as e:
            if e.status != 401:
                raise
            token = await self.session_token(admin, renew=True)  # token expired or revoked
            body = await self.request("GET", "/_synapse/admin/v2/users", query=query,
                                      access_token=token)
        nxt = body.get("next_token")
        return body.get("users", []), (int(nxt) if nxt is not None else None)

    async def admin_deactivate(self, target: str, *, admin: str, erase: bool = False) -> None:
        """Deactivate (log out everywhere, leave every room); ``erase`` for GDPR erasure."""
        await self.request("POST", f"/_synapse/admin/v1/deactivate/{q(target)}",
                           json={"erase": erase}, user_id=admin)

    async def admin_room_state(self, room_id: str, *, admin: str) -> list[dict[str, Any]] | None:
        """Every current state event of a room, or None if the server does not know it."""
        try:
            body = await self.request("GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/state",
                                      user_id=admin)
        except MatrixRequestError as e:
            if e.status in (400, 404):
                return None
            raise
        return body.get("state", [])

    async def admin_event_state(self, room_id: str, event_id: str, *,
                                admin: str) -> list[dict[str, Any]] | None:
        """The room's full state at an event (after it), through the admin context API
        (any room, member or not); None if the server does not know the event."""
        try:
            body = await self.request(
                "GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/context/{q(event_id)}",
                query={"limit": "0"}, user_id=admin)
        except MatrixRequestError as e:
            if e.status in (400, 404):
                return None
            raise
        state = body.get("state")
        return [ev for ev in state if isinstance(ev, dict)] if isinstance(state, list) else []

    async def admin_list_rooms(self, *, admin: str, start: int = 0,
                               limit: int = 500) -> tuple[list[dict[str, Any]], int | None]:
        """One page of every room the server knows (``GET /_synapse/admin/v1/rooms``)."""
        query = {"from": str(start), "limit": str(limit), "order_by": "name"}
        token = await self.session_token(admin)
        try:
            body = await self.request("GET", "/_synapse/admin/v1/rooms", query=query,
                                      access_token=token)
        except MatrixRequestError as e:
            if e.status != 401:
                raise
            token = await self.session_token(admin, renew=True)
            body = await self.request("GET", "/_synapse/admin/v1/rooms", query=query,
                                      access_token=token)
        nxt = body.get("next_batch")
        return body.get("rooms", []), (int(nxt) if nxt is not None else None)

    async def admin_joined_rooms(self, target: str, *, admin: str) -> list[str]:
        body = await self.request("GET", f"/_synapse/admin/v1/users/{q(target)}/joined_rooms",
                                  user_id=admin)
        return list(body.get("joined_rooms", []))

    # -- retention: history, purge, media ----------------------------------------------
    async def admin_room_messages(
        self, room_id: str, *, admin: str, from_token: str | None = None, dir: str = "f",
        limit: int = 1000,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of a room's timeline through the admin API (any room, member or not).

        Without ``from_token`` a forward read starts at the room's beginning. Returns
        (events, next token); the token is None at the end."""
        query = {"dir": dir, "limit": str(limit)}
        if from_token is not None:
            query["from"] = from_token
        body = await self.request("GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/messages",
                                  query=query, user_id=admin)
        chunk = body.get("chunk") or []
        end = body.get("end")
        return list(chunk), (end if chunk and end else None)

    async def admin_purge_history(self, room_id: str, *, admin: str,
                                  up_to_ts: int | None = None,
                                  up_to_event_id: str | None = None,
                                  delete_local_events: bool = True) -> str:
        """Start purging the room's history before ``up_to_event_id`` (that event stays) or
        else before ``up_to_ts``; returns the purge id."""
        if (up_to_ts is None) == (up_to_event_id is None):
            raise ValueError("give exactly one of up_to_ts and up_to_event_id")
        point: dict[str, Any] = ({"purge_up_to_event_id": up_to_event_id}
                                 if up_to_event_id is not None else {"purge_up_to_ts": up_to_ts})
        body = await self.request(
            "POST", f"/_synapse/admin/v1/purge_history/{q(room_id)}", user_id=admin,
            json={**point, "delete_local_events": delete_local_events})
        return str(body["purge_id"])

    async def admin_purge_status(self, purge_id: str, *, admin: str) -> tuple[str, str | None]:
        """(status, error) of a purge: active, complete or failed."""
        body = await self.request(
            "GET", f"/_synapse/admin/v1/purge_history_status/{q(purge_id)}", user_id=admin)
        return str(body.get("status", "unknown")), body.get("error")

    async def download_media(self, mxc: str, *, max_bytes: int) -> tuple[bytes, str | None]:
        """The bytes and content type of ``mxc://server/id`` (authenticated media API).

        Raises :class:`MatrixRequestError` (413 when larger than ``max_bytes``)."""
        server, media_id = parse_mxc(mxc)
        path = f"/_matrix/client/v1/media/download/{q(server)}/{q(media_id)}"
        headers = {"Authorization": f"Bearer {self._as_token}"}
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._session.get(self.base_url + path, headers=headers,
                                             timeout=self.timeout) as resp:
                    if resp.status != 200:
                        raw = await resp.read()
                        body = _decode(raw)
                        errcode = body.get("errcode", "M_UNKNOWN") if isinstance(
                            body, dict) else "M_UNKNOWN"
                        if resp.status >= 500 and attempt <= self.max_retries:
                            await self._sleep(self._backoff(attempt))
                            continue
                        raise MatrixRequestError(resp.status, errcode,
                                                 str(body.get("error", "")), "GET", path)
                    if resp.content_length is not None and resp.content_length > max_bytes:
                        raise MatrixRequestError(413, "M_TOO_LARGE",
                                                 f"{resp.content_length} bytes", "GET", path)
                    data = await resp.content.read(max_bytes + 1)
                    if len(data) > max_bytes:
                        raise MatrixRequestError(413, "M_TOO_LARGE", f"over {max_bytes} bytes",
                                                 "GET", path)
                    return data, resp.headers.get("Content-Type")
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                if attempt > self.max_retries:
                    raise HomeserverUnavailable(f"GET {path}: {type(e).__name__}: {e}") from e
                await self._sleep(self._backoff(attempt))

    async def admin_delete_media(self, mxc: str, *, admin: str) -> bool:
        """Delete one local media item; False when the homeserver does not have it."""
        server, media_id = parse_mxc(mxc)
        try:
            await self.request("DELETE", f"/_synapse/admin/v1/media/{q(server)}/{q(media_id)}",
                               user_id=admin)
        except MatrixRequestError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def redact(self, room_id: str, event_id: str, txn_id: str, *,
                     user_id: str | None = None, reason: str | None = None,
                     extra: dict[str, Any] | None = None,
                     before_resend: Callable[[], Awaitable[Any]] | None = None) -> str:
        content: dict[str, Any] = dict(extra or {})
        if reason:
            content["reason"] = reason
        body = await self.request(
            "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/redact/{q(event_id)}/{q(txn_id)}",
            json=content, user_id=user_id, before_resend=before_resend)
        return str(body.get("event_id", ""))

    async def resolve_alias(self, alias: str) -> str | None:
        """The room id of ``#alias:server``, or None if no room has it."""
        try:
            body = await self.request("GET", f"/_matrix/client/v3/directory/room/{q(alias)}")
        except MatrixRequestError as e:
            if e.status == 404:
                return None
            raise
        return body.get("room_id")

    async def get_state(self, room_id: str, event_type: str, state_key: str = "", *,
                        user_id: str | None = None) -> dict[str, Any] | None:
        try:
            return await self.request(
                "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state/{q(event_type)}/"
                       f"{q(state_key)}", user_id=user_id)
        except MatrixRequestError as e:
            if e.status == 404:
                return None
            raise

    async def shared_secret_register(
        self, localpart: str, password: str, secret: str, *, admin: bool
    ) -> str:
        """Register through Synapse's shared-secret endpoint (used once, for the admin)."""
        nonce = (await self.request("GET", "/_synapse/admin/v1/register", auth=False))["nonce"]
        mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce, localpart, password):
            mac.update(part.encode())
            mac.update(b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        body = await self.request(
            "POST", "/_synapse/admin/v1/register", auth=False,
            json={"nonce": nonce, "username": localpart, "password": password,
                  "admin": admin, "mac": mac.hexdigest(), "inhibit_login": True},
        )
        return body["user_id"]


def parse_mxc(mxc: str) -> tuple[str, str]:
    """('server', 'media id') of an ``mxc://`` URI; ValueError if it is not one."""
    if not isinstance(mxc, str) or not mxc.startswith("mxc://"):
        raise ValueError(f"not an mxc:// URI: {mxc!r}")
    server, _, media_id = mxc[len("mxc://"):].partition("/")
    if not server or not media_id or "/" in media_id:
        raise ValueError(f"not an mxc:// URI: {mxc!r}")
    return server, media_id


def _decode(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"errcode": "M_UNKNOWN", "error": raw[:200].decode("utf-8", "replace")}


