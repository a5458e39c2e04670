"""Enclave's side of the gate: ``POST /_enclave/gate/v1/check`` for the Synapse module.

The module (:mod:`bridge.gate.module`, inside Synapse) asks before an invite, join, room
creation, protected state change or user-directory result happens; this route
authenticates it with the shared secret, parses the question (:mod:`bridge.gate.protocol`),
hands it to the decider and answers. It decides nothing itself: ``decide`` is the policy.

Failure answers and what the module makes of them: 401 ``M_UNKNOWN_TOKEN`` (wrong or
missing secret), 400 ``M_BAD_JSON``/``M_INVALID_PARAM``/``M_MISSING_PARAM`` (malformed
question), 500 ``M_UNKNOWN`` (the decider raised). The module treats each as "Enclave
unreachable" and applies its ``on_unreachable`` setting (default: deny).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from ..metrics import Metrics
from .protocol import CHECKS, GateAnswer, GateProtocolError, GateRequest, gate_request_from_obj

__all__ = ["GATE_PATH", "Decider", "GateService"]

log = logging.getLogger(__name__)

GATE_PATH = "/_enclave/gate/v1/check"
Decider = Callable[[GateRequest], Awaitable[GateAnswer]]


def _error(status: int, errcode: str, error: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"errcode": errcode, "error": error}),
                        content_type="application/json")


class GateService:
    """The gate route. ``secret`` is the shared secret the module sends as a bearer token;
    ``decide`` answers one parsed question; ``metrics`` (optional) counts checks by check
    and outcome (``enclave_gate_checks``) and times decisions (``enclave_gate_decide_seconds``).
    """

    def __init__(self, *, secret: str, decide: Decider, metrics: Metrics | None = None):
        if not secret:
            raise ValueError("the gate secret must not be empty")
        self._secret = secret.encode()
        self._decide = decide
        self._metrics = metrics

    def add_routes(self, app: web.Application) -> None:
        """Add ``POST /_enclave/gate/v1/check`` to ``app``."""
        app.router.add_post(GATE_PATH, self.check)

    def _count(self, check: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.gate_checks.labels(check=check, outcome=outcome).inc()

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        # compare even when the header is absent or malformed, so timing says nothing
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(presented, self._secret)

    async def check(self, request: web.Request) -> web.Response:
        """Handle one check: authenticate, parse, decide, answer."""
        if not self._authorized(request):
            self._count("unknown", "unauthorized")
            log.warning("gate: refused a check from %s with a wrong or missing secret",
                        request.remote)
            return _error(401, "M_UNKNOWN_TOKEN", "Unknown or missing gate secret")
        body = await request.read()
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            self._count("unknown", "bad_request")
            return _error(400, "M_BAD_JSON", f"request body is not valid JSON: {e}")
        try:
            question = gate_request_from_obj(obj)
        except GateProtocolError as e:
            check = obj.get("check") if isinstance(obj, dict) else None
            self._count(check if isinstance(check, str) and check in CHECKS else "unknown",
                        "bad_request")
            log.warning("gate: malformed check: %s", e.message)
            return _error(400, e.errcode, e.message)
        started = time.perf_counter()
        try:
            answer = await self._decide(question)
            if not isinstance(answer, GateAnswer):
                raise TypeError(f"the decider returned {type(answer).__name__}, "
                                "not a GateAnswer")
        except Exception:
            self._count(question.check, "error")
            log.exception("gate: deciding a %s check for %s failed", question.check,
                          question.user)
            return _error(500, "M_UNKNOWN", "Enclave could not decide this check")
        if self._metrics is not None:
            self._metrics.gate_seconds.observe(time.perf_counter() - started)
        self._count(question.check, "allow" if answer.allow else "deny")
        if not answer.allow:
            # user_search refusals are routine (one per hidden search result)
            level = logging.DEBUG if question.check == "user_search" else logging.INFO
            log.log(level, "gate: %s by %s (target %s) denied by %s: %s", question.check,
                    question.user, question.target, answer.rule_id, answer.reason)
        return web.Response(body=orjson.dumps(answer.to_json()),
                            content_type="application/json")
