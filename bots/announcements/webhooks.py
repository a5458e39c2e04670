"""``POST /hooks/{id}``: other systems (HR, monitoring) make announcements.

Each hook authenticates with a bearer token or an HMAC-SHA256 signature of the raw body
(both compared in constant time), is rate limited (token bucket), and maps its JSON body
into the announcement through the hook's title/body templates. A request that fails
authentication gets 401 and changes nothing (no occurrence, no rate-limit token spent).
``Idempotency-Key`` makes a retried call create the occurrence once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets as pysecrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.config import Secret
from bridge.config.bots import WebhookConfig

from .spec import AnnouncementSpec, fill_webhook

if TYPE_CHECKING:
    from .bot import AnnouncementBot

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,80}$")


def secret_key(hook_id: str) -> str:
    """Where the hook's secret is in the resolved secrets (see ``check_secrets``)."""
    return f"bots.announcements.webhooks.{hook_id}.auth"


def verify_token(expected: str, authorization: str | None) -> bool:
    """``Authorization: Bearer TOKEN`` against the hook's token, in constant time."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization[7:].strip().encode(), expected.encode())


def sign(secret: str, body: bytes) -> str:
    """The signature a sender puts in the header: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """An HMAC-SHA256 signature (``sha256=HEX`` or ``HEX``) of exactly ``body``."""
    if not header:
        return False
    given = header.strip()
    if given.startswith("sha256="):
        given = given[7:]
    want = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(given.lower().encode(), want.encode())


@dataclass
class TokenBucket:
    """``burst`` calls at once, refilled at ``per_minute``; time is passed in."""

    per_minute: float
    burst: int
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now_s: float) -> float:
        """0 if a call may go now (a token is spent), else seconds until one may."""
        if self.tokens < 0:
            self.tokens, self.at = float(self.burst), now_s
        rate = self.per_minute / 60.0
        self.tokens = min(float(self.burst), self.tokens + (now_s - self.at) * rate)
        self.at = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


def _error(status: int, errcode: str, error: str, **headers: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": error}, status=status,
                             headers=headers or None)


class Webhooks:
    """The aiohttp route for every configured hook."""

    def __init__(self, bot: AnnouncementBot, hooks: list[WebhookConfig],
                 secrets: dict[str, Secret]):
        self.bot = bot
        self.hooks = {h.id: h for h in hooks}
        self.secrets = secrets
        self.buckets = {h.id: TokenBucket(h.rate_limit.per_minute, h.rate_limit.burst)
                        for h in hooks}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/hooks/{hook_id}", self.handle)

    def _authentic(self, hook: WebhookConfig, request: web.Request, body: bytes) -> bool:
        secret = self.secrets.get(secret_key(hook.id))
        if secret is None:
            return False
        if hook.auth.type == "token":
            return verify_token(secret.get(), request.headers.get("Authorization"))
        return verify_signature(secret.get(), body, request.headers.get(hook.auth.header))

    async def handle(self, request: web.Request) -> web.Response:
        hook = self.hooks.get(request.match_info["hook_id"])
        if hook is None:
            return _error(404, "M_NOT_FOUND", "no such hook")
        body = await request.content.read(hook.max_body_bytes + 1)
        if len(body) > hook.max_body_bytes:
            return _error(413, "M_TOO_LARGE", f"body larger than {hook.max_body_bytes} bytes")
        if not self._authentic(hook, request, body):
            log.warning("webhook %s: request from %s refused (bad token or signature)",
                        hook.id, request.remote)
            self.bot.svc.metrics.actions.labels(kind="webhook", outcome="unauthorized").inc()
            return _error(401, "M_UNAUTHORIZED", "bad or missing token or signature")
        wait = self.buckets[hook.id].take(time.monotonic())
        if wait > 0:
            return _error(429, "M_LIMIT_EXCEEDED", "rate limited",
                          **{"Retry-After": str(int(wait) + 1)})
        try:
            payload: Any = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            return _error(400, "M_NOT_JSON", "the body is not JSON")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _KEY_RE.match(key):
            return _error(400, "M_INVALID_PARAM", "Idempotency-Key: 1-80 of A-Z a-z 0-9 . _ : -")
        now = self.bot.svc.clock_ms()
        occ_id = key or f"{now}-{pysecrets.token_hex(4)}"
        title = fill_webhook(hook.title, payload).strip() or hook.id
        text = fill_webhook(hook.body, payload).strip()
        spec = AnnouncementSpec.from_config(hook, title=title, body=text,
                                            timezone=self.bot.cfg.timezone)
        created, sel = await self.bot.create_occurrence(
            hook.id, occ_id, "webhook", spec, now, f"webhook:{hook.id}")
        return web.json_response(
            {"announcement": hook.id, "occurrence": occ_id, "created": created,
             "recipients": len(sel.users), "rooms": len(sel.rooms)},
            status=202 if created else 200)
