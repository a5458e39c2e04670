"""The application-service HTTP API the homeserver calls, plus health, readiness and metrics.

Every answer is spec-shaped JSON (``errcode`` + ``error``), whatever the input: the
middleware turns routing errors, oversized bodies and unexpected exceptions into JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..metrics import Metrics
from ..store.domains import InboxStore, JournalStore
from .transactions import SECTIONS, BadTransaction, check_container

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, errcode: str, error: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"errcode": errcode, "error": error}),
        content_type="application/json",
    )


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def check_hs_token(
    authorization: str | list[str] | None, query_token: str | list[str] | None,
    expected: bytes,
) -> web.Response | None:
    """Authenticate the homeserver: None if allowed, else the error response to send.

    Accepts ``Authorization: Bearer`` and the legacy ``access_token`` query parameter; if
    both are present they must agree. Comparison is constant-time. Lists are every value
    the request carried: more than one header (or query token) is refused whatever they
    hold, so a right token cannot vouch for a wrong one.
    """
    if isinstance(authorization, list):
        if len(authorization) > 1:
            return error_response(401, "M_UNAUTHORIZED",
                                  "More than one Authorization header")
        authorization = authorization[0] if authorization else None
    if isinstance(query_token, list):
        if len(query_token) > 1:
            return error_response(401, "M_UNAUTHORIZED",
                                  "More than one access_token parameter")
        query_token = query_token[0] if query_token else None
    header_token: str | None = None
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            header_token = value.strip()
    if header_token is None and query_token is None:
        return error_response(401, "M_UNAUTHORIZED", "Missing homeserver token")
    if header_token is not None and query_token is not None and not hmac.compare_digest(
        header_token.encode(), query_token.encode()
    ):
        return error_response(403, "M_FORBIDDEN", "Header and query tokens disagree")
    token = header_token if header_token is not None else query_token
    assert token is not None
    if not hmac.compare_digest(token.encode(), expected):
        return error_response(403, "M_FORBIDDEN", "Bad homeserver token")
    return None


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "M_TOO_LARGE", "Request body too large")
    except web.HTTPMethodNotAllowed:
        return error_response(405, "M_UNRECOGNIZED", "Method not allowed on this endpoint")
    except web.HTTPNotFound:
        return error_response(404, "M_UNRECOGNIZED", "Unrecognized request")
    except web.HTTPException as e:
        return error_response(e.status, "M_UNKNOWN", e.reason or "error")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "M_UNKNOWN", "Internal error")


def transaction_key(txn_id: str, body: dict[str, Any]) -> str:
    """What identifies a transaction: the homeserver's id AND what it carries.

    Synapse on SQLite restarts its transaction ids at 1 when it restarts with no
    transaction pending (its id generator reads only the pending-transactions table), so
    an id alone would make a new transaction look like a resend and lose its events. A
    resend carries the same events (its ``age`` fields differ, so the body is not hashed as
    is): the event ids are the identity; a transaction of ephemeral data only is hashed
    whole (Synapse does not store ephemeral data, so it never resends it).
    """
    ids = [e.get("event_id") for e in body.get("events") or [] if isinstance(e, dict)]
    h = hashlib.sha256()
    if ids:
        for i in ids:
            h.update(str(i).encode() + b"\0")
    else:
        h.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return f"{txn_id}#{h.hexdigest()[:16]}"


class AppserviceAPI:
    """Routes of the appservice API; transactions go to the durable inbox before ``{}``."""

    def __init__(
        self, journal: JournalStore, inbox: InboxStore, metrics: Metrics, *, hs_token: str,
        on_new_events: Callable[[], None],
        user_exists: Callable[[str], Awaitable[bool]], ready: Callable[[], Awaitable[dict]],
        clock_ms: Callable[[], int], on_request: Callable[[], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ):
        self.journal = journal
        self.inbox = inbox
        self.metrics = metrics
        self._hs_token = hs_token.encode()
        self._on_new_events = on_new_events
        self._user_exists = user_exists
        self._ready = ready
        self._clock_ms = clock_ms
        self._on_request = on_request
        self._on_refused = on_refused
        self._refuse_next = False

    def request_recovery_sweep(self) -> None:
        """Refuse the next transaction once, so the homeserver runs its recovery."""
        self._refuse_next = True

    def routes(self) -> list[web.RouteDef]:
        p = "/_matrix/app/v1"
        return [
            web.put(p + "/transactions/{txn_id}", self.put_transaction),
            web.get(p + "/users/{user_id}", self.get_user),
            web.get(p + "/rooms/{alias}", self.get_room_alias),
            web.post(p + "/ping", self.post_ping),
            web.get("/health", self.health),
            web.get("/ready", self.ready),
            web.get("/metrics", self.metrics_endpoint),
        ]

    def _auth(self, request: web.Request) -> web.Response | None:
        return check_hs_token(
            request.headers.getall("Authorization", []),
            request.query.getall("access_token", []), self._hs_token,
        )

    async def _read_raw_json(self, request: web.Request) -> tuple[bytes, Any]:
        raw = await request.read()  # raises 413 past client_max_size
        try:
            return raw, orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise _BadBody("M_NOT_JSON", f"Content not JSON: {e}") from None

    async def _read_json(self, request: web.Request) -> Any:
        return (await self._read_raw_json(request))[1]

    async def put_transaction(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if self._on_request is not None:
            self._on_request()
        if (denied := self._auth(request)) is not None:
            self.metrics.transactions.labels(result="unauthorized").inc()
            return denied
        txn_id = request.match_info["txn_id"]
        try:
            raw, body = await self._read_raw_json(request)
            check_container(body)
        except _BadBody as e:
            self.metrics.transactions.labels(result="rejected").inc()
            return error_response(400, e.errcode, e.message)
        except BadTransaction as e:
            self.metrics.transactions.labels(result="rejected").inc()
            return error_response(400, "M_BAD_JSON", str(e))
        if len(txn_id) > 255:
            return error_response(400, "M_INVALID_PARAM", "Transaction id too long")
        if self._refuse_next:
            # A recovery sweep: the homeserver keeps this transaction, marks us down and,
            # once pinged, resends everything it holds for us oldest first, including any
            # transaction it stranded during an earlier catch-up.
            self._refuse_next = False
            self.metrics.transactions.labels(result="refused_for_recovery").inc()
            log.info("recovery sweep: asking the homeserver to redeliver from txn %s", txn_id)
            if self._on_refused is not None:
                self._on_refused()
            return error_response(503, "M_UNKNOWN", "Recovery sweep: please resend")
        key = transaction_key(txn_id, body)
        try:
            # The only write before the answer: the body as received, in the journal. The
            # inbox processor expands it into events (and quarantines bad ones) afterwards.
            is_new = await self.journal.journal_append(key, raw, self._clock_ms())
        except Exception:
            # Not stored, so not acknowledged: the homeserver keeps it and resends later.
            log.exception("could not store transaction %s", txn_id)
            self.metrics.transactions.labels(result="store_error").inc()
            return error_response(503, "M_UNKNOWN", "Store unavailable; retry later")
        if is_new:
            if any(body.get(key) for key, _ in SECTIONS):
                self._on_new_events()
        else:
            self.metrics.transactions.labels(result="duplicate").inc()
        self.metrics.txn_seconds.observe(time.perf_counter() - started)
        return json_response({})

    async def get_user(self, request: web.Request) -> web.Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if await self._user_exists(request.match_info["user_id"]):
            return json_response({})
        return error_response(404, "M_NOT_FOUND", "No such user in Enclave's namespace")

    async def get_room_alias(self, request: web.Request) -> web.Response:
        if (denied := self._auth(request)) is not None:
            return denied
        return error_response(404, "M_NOT_FOUND", "Enclave does not create rooms by alias")

    async def post_ping(self, request: web.Request) -> web.Response:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            body = await self._read_json(request)
        except _BadBody as e:
            return error_response(400, e.errcode, e.message)
        if not isinstance(body, dict):
            return error_response(400, "M_BAD_JSON", "Body must be an object")
        # start-up logs the ping it asked for; recovery sweeps ping too
        log.debug("ping from homeserver (transaction_id=%s)", body.get("transaction_id"))
        return json_response({})

    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        report = await self._ready()
        return json_response(report, status=200 if report.get("ready") else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        try:
            stats = await self.inbox.inbox_stats()
        except Exception as e:  # metrics must answer even when the store is sick
            log.warning("inbox stats unavailable for /metrics: %s", e)
        else:
            # The store only reports statuses that have rows: reset first, or a status that
            # dropped to zero (e.g. no pending actions left) would keep its last value.
            for gauge, known, counts in (
                (self.metrics.inbox_events, _EVENT_STATUSES, stats["events"]),
                (self.metrics.actions_by_status, _ACTION_STATUSES, stats["actions"]),
            ):
                gauge.clear()
                for status in known:
                    gauge.labels(status=status).set(0)
                for status, n in counts.items():
                    gauge.labels(status=status).set(n)
            self.metrics.quarantine_size.set(stats["quarantined"])
            oldest = stats["oldest_pending_received_at"]
            self.metrics.inbox_oldest_pending.set(
                max(0.0, (self._clock_ms() - oldest) / 1000) if oldest else 0.0
            )
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


# Statuses always exported (as 0 when empty) so dashboards and alerts see a value.
_EVENT_STATUSES = ("pending", "done", "parked")
_ACTION_STATUSES = ("pending", "applied", "failed", "parked")


class _BadBody(Exception):
    def __init__(self, errcode: str, message: str):
        self.errcode = errcode
        self.message = message
